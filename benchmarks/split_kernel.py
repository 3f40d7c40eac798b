"""The split kernel (per-query sparse attention at inference) on one GPU: for a prefill and a decode step of the 1B
Llama's attention (32 query heads over 8 key/value heads of 64), each selection per head (`_sparse_split_head`:
elementwise float32 products) or per key/value group (`_sparse_split_group`: the group's 4 heads as the rows of
tensor-core products, each key loaded once). Random key ranges of the budget's size; each result checked against the
float32 PyTorch path on its first rows. Prints one row per case: the median time and the bytes of selected keys and
values the selections name per ms (a group's keys counted once).

    python benchmarks/split_kernel.py --length 8192
"""

import argparse
from functools import partial

import torch
import triton

from sea import sea_sparse_kernels
from sea.sea_attention import SeaSelection, sparse_attention


def random_selection(heads, length, queries, ranges, budget, device):
    """`ranges` disjoint-enough random ranges per row, `budget` keys in all, every key visible."""
    lengths = torch.full((1, heads, queries, ranges), budget // ranges, device=device)
    starts = (torch.rand(1, heads, queries, ranges, device=device) * (length - budget // ranges)).long()
    counts = torch.full((1, queries), length, device=device)
    return starts, lengths, counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--ranges", type=int, default=16)
    args = parser.parse_args()
    device = "cuda"
    h, g, d = args.heads, args.kv_heads, args.head_dim
    k, v = (torch.randn(1, g, args.length, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    print("| step | heads per selection | ms | GB/s of keys+values | relative error |")
    print("|---|---|---|---|---|")
    for step, queries in (("prefill", args.length), ("decode", 1)):
        q = torch.randn(1, h, queries, d, device=device, dtype=torch.bfloat16)
        for shared in (1, h // g):
            starts, lengths, counts = random_selection(h // shared, args.length, queries, args.ranges, args.budget,
                                                       device)
            selection = SeaSelection(starts, lengths, None, counts, 1, heads_per_selection=shared)
            rows = min(queries, 512)  # the reference on the first rows only (it gathers every row's keys)
            part = SeaSelection(starts[:, :, :rows], lengths[:, :, :rows], None, counts[:, :rows], 1,
                                heads_per_selection=shared)
            _, reference = sparse_attention(q[:, :, :rows].float(), k.float(), v.float(), part, d**-0.5)
            run = partial(sea_sparse_kernels.per_query_inference_attention, q, k, v, selection, d**-0.5)
            error = float((run()[:, :, :rows].float() - reference).norm() / reference.norm())
            ms = triton.testing.do_bench(run, warmup=25, rep=200)
            read = (h // shared) * queries * args.budget * 2 * d * 2 / 1e9  # GB of selected keys and values
            print(f"| {step} | {shared} | {ms:.3f} | {read / ms * 1e3:.0f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
