"""One attention layer on a GPU: SEA (whole operator: estimate, selection, sparse attention, gates) with the
Triton kernel, next to SDPA (flash backend), FlexAttention (causal block mask) and eager dense attention.
Prints a correctness check of the kernel against the float32 PyTorch path, then a timing/memory table; writes
JSON.

    python benchmarks/attention.py --lengths 1024 4096 16384 32768 --json results.json
"""

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

from sea.configuration_sea import SeaBertConfig, SeaOptConfig
from sea.sea_attention import SeaAttention


def sea_layer(heads, head_dim, causal, kernel, budget, width, device):
    config_class = SeaOptConfig if causal else SeaBertConfig
    config = config_class(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=1 << 17,
                          sea_key_budget=budget, sea_compressed_width=width, sea_kernel=kernel)
    op = SeaAttention(config, heads, head_dim, causal).to(device)
    op.init_sea_weights()
    with torch.no_grad():  # non-neutral gates, so the check covers them too
        op.gates.weight.normal_(std=0.1)
    return op


def relative(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_kernel(device, heads=12, head_dim=64, length=2048):
    """The Triton path in bf16 against the PyTorch path in float32, on fresh random inputs: forward context,
    probabilities and input gradients; no NaN anywhere."""
    rows = []
    for causal in (True, False):
        reference = sea_layer(heads, head_dim, causal, "torch", 64, 128, device)
        kernel = sea_layer(heads, head_dim, causal, "triton", 64, 128, device)
        kernel.load_state_dict(reference.state_dict())
        q, k, v = (torch.randn(1, heads, length, head_dim, device=device) for _ in range(3))
        inputs32 = [x.clone().requires_grad_() for x in (q, k, v)]
        inputs16 = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
        ref = reference(*inputs32, None, head_dim**-0.5)
        got = kernel.to(torch.bfloat16)(*inputs16, None, head_dim**-0.5, selection=ref.selection)
        grad = torch.randn_like(ref.context)
        ref_grads = torch.autograd.grad((ref.context * grad).sum(), inputs32)
        got_grads = torch.autograd.grad((got.context.float() * grad).sum(), inputs16)
        row = {"causal": causal, "context": relative(got.context, ref.context),
               "probs": relative(got.sparse_probs, ref.sparse_probs),
               **{f"grad_{n}": relative(a, b) for n, a, b in zip("qkv", got_grads, ref_grads)},
               "finite": bool(all(torch.isfinite(t).all() for t in (got.context, *got_grads)))}
        rows.append(row)
    return rows


def timed(fn, repeats=5):
    """Median milliseconds and peak allocated MB of fn() after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def methods(heads, head_dim, causal, length, device):
    op = sea_layer(heads, head_dim, causal, "auto", 64, 128, device).to(torch.bfloat16)
    scaling = head_dim**-0.5

    def sea(q, k, v):
        return op(q, k, v, None, scaling).context

    def sdpa(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    found = {"sea": sea, "sdpa_flash": sdpa}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)
        if causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, length, length, device=device)
            found["flex"] = lambda q, k, v: compiled(q, k, v, block_mask=mask)
        else:
            found["flex"] = lambda q, k, v: compiled(q, k, v)
    except ImportError:
        pass
    if length <= 16384:
        def eager(q, k, v):
            scores = (q @ k.transpose(-1, -2)) * scaling
            if causal:
                scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool, device=device).triu(1), -math.inf)
            return torch.softmax(scores.float(), -1).to(v.dtype) @ v
        found["eager"] = eager
    return found


def benchmark(lengths, heads, head_dim, device):
    rows = []
    for causal in (True, False):
        for length in lengths:
            q, k, v = (torch.randn(1, heads, length, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
            for name, fn in methods(heads, head_dim, causal, length, device).items():
                for mode in ("forward", "forward+backward"):
                    inputs = [x.clone().requires_grad_(mode != "forward") for x in (q, k, v)]

                    def step():
                        if mode == "forward":
                            with torch.no_grad():
                                fn(*inputs)
                        else:
                            fn(*inputs).float().square().mean().backward()

                    try:
                        ms, mb = timed(step)
                    except torch.OutOfMemoryError:
                        ms, mb = float("nan"), float("nan")
                        torch.cuda.empty_cache()
                    rows.append({"causal": causal, "length": length, "method": name, "mode": mode, "heads": heads,
                                 "head_dim": head_dim, "ms": ms, "peak_mb": mb})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows):
    print("\n| causal | mode | T | method | ms | peak MB | time / SDPA | memory / SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        sdpa = next(r for r in rows if r["method"] == "sdpa_flash" and all(
            r[key] == row[key] for key in ("causal", "mode", "length", "heads", "head_dim")))
        print(f"| {row['causal']} | {row['mode']} | {row['length']} | {row['method']} | {row['ms']:.2f} | "
              f"{row['peak_mb']:.0f} | {row['ms'] / sdpa['ms']:.2f} | {row['peak_mb'] / max(sdpa['peak_mb'], 1e-9):.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    checks = check_kernel(device, args.heads, args.head_dim)
    print("kernel check (bf16 Triton vs float32 PyTorch, relative L2 error):")
    for row in checks:
        print(json.dumps(row))
    rows = benchmark(args.lengths, args.heads, args.head_dim, device)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "check": checks,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
