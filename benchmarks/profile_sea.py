"""Where one SEA layer's forward spends its time on a GPU: the top CUDA kernels of torch.profiler, grouped.

    python benchmarks/profile_sea.py --length 32768
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from attention import sea_layer, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--key-budget", type=int, default=1024)
    parser.add_argument("--width", type=int, default=128, help="sea_compressed_width (M)")
    parser.add_argument("--query-block", type=int, default=64, help="sea_query_block_size")
    args = parser.parse_args()
    device = torch.device("cuda")
    op = sea_layer(args.heads, args.head_dim, not args.bidirectional, "auto", args.key_budget, args.width,
                   args.query_block, device).to(torch.bfloat16)
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    with torch.no_grad():
        for _ in range(2):
            op(q, k, v, None, args.head_dim**-0.5, need_probs=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            op(q, k, v, None, args.head_dim**-0.5, need_probs=False)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    with torch.no_grad():
        ms, mb = timed(lambda: op(q, k, v, None, args.head_dim**-0.5, need_probs=False), repeats=10)
    print(f"whole layer forward: median {ms:.2f} ms, peak {mb:.0f} MB above the inputs")


if __name__ == "__main__":
    main()
