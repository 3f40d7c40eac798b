"""What holds a causal model's GPU memory at the peak of one prefill (`model(ids, logits_to_keep=1)` with a cache,
as `generate` runs it): the CUDA caching allocator's history of the call, replayed to its peak, and the tensors
alive there grouped by the line of SEA's code (or else of the model's) that allocated them. The dense model and its
SEA conversion side by side, random weights, bf16.

    python benchmarks/profile_memory.py --shape llama-1b --length 8192
"""

import argparse
from collections import defaultdict

import torch

from end_to_end import SHAPES, dense_model, sea_model

OWN_CODE = ("/sea/", "/transformers/")  # the first frame inside these names the allocation


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame in SEA's code, else in transformers', of an allocation's Python stack."""
    for marker in OWN_CODE:
        for frame in frames:
            if marker in frame["filename"]:
                name = frame["filename"].split(marker)[-1]
                return f"{marker.strip('/')}/{name}:{frame['line']} {frame['name']}"
    return "elsewhere"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[str, int]]:
    """Replays the allocator's events: the largest total of the blocks allocated during the trace and alive at once,
    and those blocks' bytes by allocation site."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event["frames"])
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    by_site = defaultdict(int)
    for size, frames in at_peak.values():
        by_site[allocation_site(frames)] += size
    return peak, dict(by_site)


def profiled_prefill(model, ids) -> tuple[int, dict[str, int]]:
    with torch.no_grad():
        model(ids, logits_to_keep=1)  # warm-up: kernels compiled, allocator blocks made
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
        model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    return live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])


def print_table(name: str, peak: int, by_site: dict[str, int], rows: int):
    print(f"\n{name}: {peak / 2**20:.0f} MB allocated during the call and alive at its peak")
    print("| MB | allocated at |\n|---|---|")
    for site, size in sorted(by_site.items(), key=lambda item: -item[1])[:rows]:
        print(f"| {size / 2**20:.1f} | `{site}` |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-1b", choices=list(SHAPES))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--key-budget", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=15, help="allocation sites listed per model")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = dense_model(args.shape, max(args.length, 2048), "cuda", torch.bfloat16)
    ids = torch.randint(3, dense.config.vocab_size, (1, args.length), device="cuda")
    print(f"{args.shape}, T = {args.length}, batch 1, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print_table("dense (SDPA)", *profiled_prefill(dense, ids), args.rows)
    sea = sea_model(dense, args.key_budget, "cuda")
    del dense
    print_table(f"SEA (key budget {args.key_budget}, defaults)", *profiled_prefill(sea, ids), args.rows)


if __name__ == "__main__":
    main()
