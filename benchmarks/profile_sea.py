"""Where one SEA layer's forward spends its time on a GPU: the top CUDA kernels of torch.profiler, grouped, and
the host time of the layer's PyTorch operations. `--decode`: one decode step (one new query over `--length`
cached keys, continuing a causal state) instead of a prefill.

    python benchmarks/profile_sea.py --length 32768
    python benchmarks/profile_sea.py --length 65536 --decode --query-block 1
    python benchmarks/profile_sea.py --length 8192 --heads 32 --kv-heads 8 --group-selection --query-block 1
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from attention import sea_layer, timed


def top_level_operations(prof) -> list:
    """The aten operations the code called (not the ones other aten operations called)."""
    def nested(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return [e for e in prof.events() if e.name.startswith("aten::") and not nested(e)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--group-selection", action="store_true", help="sea_group_selection (with --kv-heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--key-budget", type=int, default=1024)
    parser.add_argument("--width", type=int, default=128, help="sea_compressed_width (M)")
    parser.add_argument("--query-block", type=int, default=64, help="sea_query_block_size")
    parser.add_argument("--decode", action="store_true", help="one decode step over --length cached keys")
    args = parser.parse_args()
    device = torch.device("cuda")
    op = sea_layer(args.heads, args.head_dim, not args.bidirectional, "auto", args.key_budget, args.width,
                   args.query_block, device, args.kv_heads, args.group_selection).to(torch.bfloat16)
    q, k, v = (torch.randn(1, heads, args.length, args.head_dim, device=device, dtype=torch.bfloat16)
               for heads in (args.heads, args.kv_heads or args.heads, args.kv_heads or args.heads))
    if args.decode:
        q = q[:, :, -1:]
        state = op.initial_state(1, torch.bfloat16, device).map(lambda t: torch.rand_like(t) * args.length)
        key_valid = torch.ones(1, args.length, dtype=torch.bool, device=device)
        run = lambda: op(q, k, v, key_valid, args.head_dim**-0.5, state=state, need_probs=False)  # noqa: E731
    else:
        run = lambda: op(q, k, v, None, args.head_dim**-0.5, need_probs=False)  # noqa: E731
    with torch.no_grad():
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(f"host: {len(top_level_operations(prof))} PyTorch operations (not counting those they call)")
    with torch.no_grad():
        ms, mb = timed(run, repeats=10)
    print(f"whole layer {'decode step' if args.decode else 'forward'}: median {ms:.2f} ms, peak {mb:.0f} MB above "
          "the inputs")


if __name__ == "__main__":
    main()
