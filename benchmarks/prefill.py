"""End-to-end prefill (one forward over the whole prompt, no cache): SeaOptForCausalLM vs OPTForCausalLM with
SDPA, same shapes and random weights, positions extended to the longest length. Median time and peak memory.

    python benchmarks/prefill.py --device cuda --dtype bfloat16 --shapes opt-125m opt-1.3b --lengths 8192 32768
"""

import argparse
import json
import statistics
import time

import torch
from transformers import OPTConfig, OPTForCausalLM

from conversion.convert import convert_to_sea

SHAPES = {
    "opt-125m": dict(hidden_size=768, num_attention_heads=12, ffn_dim=3072, num_hidden_layers=12),
    "opt-1.3b": dict(hidden_size=2048, num_attention_heads=32, ffn_dim=8192, num_hidden_layers=24),
}


def timed(model, ids, device, repeats):
    """Median seconds and peak MB (above the weights) of one forward."""
    def forward():
        with torch.no_grad():
            model(ids, use_cache=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    forward()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.startswith("cuda") else float("nan")
    return statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["opt-125m"], choices=sorted(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--key-budget", type=int, default=64)
    parser.add_argument("--width", type=int, default=128, help="sea_compressed_width (M)")
    parser.add_argument("--query-block", type=int, default=1, help="sea_query_block_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in args.shapes:
        config = OPTConfig(**SHAPES[shape], max_position_embeddings=max(args.lengths))
        dense = OPTForCausalLM._from_config(config, attn_implementation="sdpa").eval()
        sea = convert_to_sea(dense, sea_key_budget=args.key_budget, sea_compressed_width=args.width,
                             sea_query_block_size=args.query_block).to(args.device, dtype)
        dense = dense.to(args.device, dtype)
        for length in args.lengths:
            ids = torch.randint(3, config.vocab_size, (1, length), device=args.device)
            for name, model in (("dense sdpa", dense), ("sea", sea)):
                seconds, peak = timed(model, ids, args.device, args.repeats)
                rows.append({"shape": shape, "length": length, "model": name, "ms": seconds * 1000, "peak_mb": peak})
                print(json.dumps(rows[-1]), flush=True)
        del dense, sea
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\nprefill, batch 1, {args.dtype}, device {args.device}, SEA key budget {args.key_budget}, M {args.width}, "
          f"query blocks of {args.query_block}")
    print("| shape | T | dense SDPA ms | SEA ms | dense / SEA | dense peak MB | SEA peak MB |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for length in args.lengths:
            dense_row, sea_row = (next(r for r in rows if r["shape"] == shape and r["length"] == length
                                       and r["model"] == m) for m in ("dense sdpa", "sea"))
            print(f"| {shape} | {length} | {dense_row['ms']:.1f} | {sea_row['ms']:.1f} | "
                  f"{dense_row['ms'] / sea_row['ms']:.2f} | {dense_row['peak_mb']:.0f} | {sea_row['peak_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
