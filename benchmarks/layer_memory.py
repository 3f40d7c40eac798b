"""Peak memory and time of one SEA attention layer vs dense attention, on the CPU.

One `SeaOptAttention` layer (q/k/v/o projections + SEA; 12 heads, head_dim 64, fp32, batch 1, forward without
gradients) at T = 1k ... 16k, side by side with the same layer computing dense attention: eager (the T x T
probabilities built, as `output_attentions` needs) and SDPA. Every measurement runs in its own process: the peak
is the process's peak resident memory minus its resident memory just before the forward (malloc set to return
large blocks to the OS at once), and the time is the median of `--repeats` forwards after a warm-up, in a run
with the default malloc.

    python benchmarks/layer_memory.py [--lengths 1024 2048 4096 8192 16384] [--repeats 3]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 12, 64
HIDDEN = HEADS * HEAD_DIM


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_layer(method: str, length: int):
    from sea.configuration_sea import SeaOptConfig
    from sea.modeling_sea import SeaOptAttention

    config = SeaOptConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=max(length, 2048))
    layer = SeaOptAttention(config, layer_idx=0).eval()
    layer.sea.init_sea_weights()
    if method == "sea":
        return lambda h: layer(h)[0]

    def dense(h):
        n, t, _ = h.shape
        shape = (n, t, HEADS, HEAD_DIM)
        q = (layer.q_proj(h) * layer.scaling).view(shape).transpose(1, 2)
        k = layer.k_proj(h).view(shape).transpose(1, 2)
        v = layer.v_proj(h).view(shape).transpose(1, 2)
        if method == "sdpa":
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        else:
            scores = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            context = torch.softmax(scores, -1) @ v
        return layer.out_proj(context.transpose(1, 2).reshape(n, t, HIDDEN))

    return dense


def measure(method: str, length: int, what: str, repeats: int) -> float:
    """Median seconds of a forward, or its peak MB; run in a child process so the peak is this forward's alone."""
    torch.set_num_threads(os.cpu_count() or 1)
    forward = build_layer(method, length)
    hidden = torch.randn(1, length, HIDDEN)
    with torch.no_grad():
        if what == "peak_mb":
            before = resident_mb()
            forward(hidden)
            return peak_resident_mb() - before
        forward(hidden)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward(hidden)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_child(method: str, length: int, repeats: int) -> dict:
    result = {"method": method, "length": length}
    for what in ("seconds", "peak_mb"):
        command = [sys.executable, __file__, "--child", method, str(length), what, "--repeats", str(repeats)]
        # For the peak: large blocks straight from and back to the OS, so resident memory follows live tensors
        # rather than malloc's cache. (That slows allocation down, so times are taken in a separate run.)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0") if what == "peak_mb" else None
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {**result, "error": done.stderr.strip().splitlines()[-1]}
        result[what] = float(done.stdout.strip().splitlines()[-1])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=["sea", "sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--eager-max-length", type=int, default=8192,
        help="longest T for eager dense attention (its T x T probabilities need ~25 GB at 16k)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "LENGTH", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.child[0], int(args.child[1]), args.child[2], args.repeats))
        return
    results = [
        run_child(m, t, args.repeats) if m != "eager" or t <= args.eager_max_length
        else {"method": m, "length": t, "error": "skipped (memory)"}
        for t in args.lengths for m in args.methods
    ]
    by = {(r["method"], r["length"]): r for r in results}
    print(f"one causal attention layer, {HEADS} heads x {HEAD_DIM}, fp32, batch 1, forward, CPU ({os.cpu_count()} cores)")
    header = "".join(f"| {m} ms | {m} peak MB " for m in args.methods)
    print(f"| T {header}|")
    print("|---" * (1 + 2 * len(args.methods)) + "|")
    for t in args.lengths:
        cells = ""
        for m in args.methods:
            r = by[(m, t)]
            cells += f"| {r['error'][:20]} | - " if "error" in r else f"| {r['seconds'] * 1e3:.0f} | {r['peak_mb']:.0f} "
        print(f"| {t} {cells}|")
    for m in args.methods:
        low, high = by.get((m, 2048), {}), by.get((m, 8192), {})
        if "peak_mb" in low and "peak_mb" in high:
            print(f"{m}: peak memory T=8k / T=2k = {high['peak_mb'] / low['peak_mb']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
