"""One attention layer on a GPU, side by side in one run: SEA (the whole operator: estimate, selection, Triton
sparse kernel, gates), SEA's sparse kernel alone (selection given), SDPA with the flash and with the cuDNN backend,
FlexAttention with the causal (or no) mask and with a block mask holding SEA's selected keys, and eager dense
attention (up to 16k tokens). Prints a correctness check of the kernels against the float32 PyTorch path, then a
table (median time, peak memory above the inputs, and both against the fastest and the leanest dense method of the
same problem in this run: SDPA flash or cuDNN, causal or unmasked FlexAttention, eager); writes JSON and PNG plots.

    python benchmarks/attention.py --shapes 12x64 --json results.json --plots plots_folder
"""

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sea.configuration_sea import SeaBertConfig, SeaOptConfig
from sea.sea_attention import sparse_attention
from sea.sea_dispatch import sparse_attention_triton
from sea.sea_layer import SeaAttention

FLEX_BLOCK = 128
METHODS = ("sea", "sea_sparse_only", "sdpa_flash", "sdpa_cudnn", "flex", "flex_sea_mask", "eager")
# Exact dense attention: the rivals every ratio is against.
DENSE_METHODS = ("sdpa_flash", "sdpa_cudnn", "flex", "eager")
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def sea_layer(heads, head_dim, causal, kernel, budget, width, block, device, kv_heads=None, group_selection=False):
    config_class = SeaOptConfig if causal else SeaBertConfig
    config = config_class(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=1 << 17,
                          sea_key_budget=budget, sea_compressed_width=width, sea_kernel=kernel,
                          sea_query_block_size=block, sea_group_selection=group_selection)
    op = SeaAttention(config, heads, head_dim, causal, kv_heads).to(device)
    op.init_sea_weights()
    with torch.no_grad():  # non-neutral gates, so the check covers them too
        op.gates.weight.normal_(std=0.1)
    return op


def relative(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_kernels(device, heads, head_dim, budget, width, block, length=4096):
    """On fresh random inputs with SEA's own selections: the Triton kernel in bf16 against the PyTorch sparse
    attention in float32 (context, probabilities, gradients through both), and the whole operator in bf16 against
    the whole operator in float32 with the selection held (context; with gradients, and for inference, where
    causal layers run the fused estimate kernels); no NaN anywhere. Deterministic mode fills the memory `torch.empty`
    hands out with NaN, so `finite` also says that the kernels wrote every element of their outputs."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _check_rows(device, heads, head_dim, budget, width, block, length)
    finally:
        torch.use_deterministic_algorithms(False)


def _check_rows(device, heads, head_dim, budget, width, block, length):
    rows = []
    for causal in (True, False):
        for rows_per_block in sorted({1, block}):
            reference = sea_layer(heads, head_dim, causal, "torch", budget, width, rows_per_block, device)
            q, k, v = (torch.randn(1, heads, length, head_dim, device=device) for _ in range(3))
            scaling = head_dim**-0.5
            ref = reference(q, k, v, None, scaling)
            inputs32 = [x.clone().requires_grad_() for x in (q, k, v)]
            inputs16 = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
            ref_probs, ref_context = sparse_attention(*inputs32, ref.selection, scaling)
            probs, context = sparse_attention_triton(*inputs16, ref.selection, scaling)
            grad, grad_probs = torch.randn_like(ref_context), torch.randn_like(ref_probs)
            ref_grads = torch.autograd.grad((ref_context * grad).sum() + (ref_probs * grad_probs).sum(), inputs32)
            got_grads = torch.autograd.grad((context.float() * grad).sum() + (probs.float() * grad_probs).sum(), inputs16)
            kernel = sea_layer(heads, head_dim, causal, "triton", budget, width, rows_per_block, device)
            kernel.load_state_dict(reference.state_dict())
            inputs = [x.to(torch.bfloat16) for x in (q, k, v)]
            whole = kernel.to(torch.bfloat16)(*inputs, None, scaling, selection=ref.selection)
            with torch.no_grad():  # inference: the fused estimate kernels, no probabilities
                inference = kernel(*inputs, None, scaling, selection=ref.selection, need_probs=False)
            rows.append({"causal": causal, "query_block": rows_per_block, "kernel_context": relative(context, ref_context),
                         "kernel_probs": relative(probs, ref_probs),
                         **{f"kernel_grad_{n}": relative(a, b) for n, a, b in zip("qkv", got_grads, ref_grads)},
                         "operator_context": relative(whole.context, ref.context),
                         "inference_context": relative(inference.context, ref.context),
                         "finite": bool(all(torch.isfinite(t).all()
                                            for t in (context, probs, whole.context, inference.context, *got_grads)))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timed(fn, repeats):
    """Median milliseconds and peak allocated MB (above what was allocated before) of fn() after a warm-up call."""
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


def flex_block_mask(selection, causal, length, device):
    """A FlexAttention block mask (blocks of 128 x 128) holding every key SEA selected for every query of a block:
    the kv blocks that SEA's key ranges touch, for the query blocks of 128 rows (two of SEA's 64-row blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    n, h, r, _ = selection.starts.shape
    blocks = length // FLEX_BLOCK
    starts, ends = selection.starts, selection.starts + selection.lengths  # ranks == positions: no padding here
    # dense[b, h, query block, kv block]; one extra kv column collects the tiles of empty ranges.
    dense = torch.zeros(n, h, blocks, blocks + 1, dtype=torch.bool, device=device)
    batch, head = torch.arange(n, device=device)[:, None, None, None], torch.arange(h, device=device)[None, :, None, None]
    q_block = (torch.arange(r, device=device) * selection.rows_per_block // FLEX_BLOCK)[None, None, :, None]
    span = int(((ends - 1) // FLEX_BLOCK - starts // FLEX_BLOCK).max()) + 1
    for j in range(span):
        kv = starts // FLEX_BLOCK + j
        used = (kv * FLEX_BLOCK < ends) & (selection.lengths > 0)
        dense[batch, head, q_block, kv.masked_fill(~used, blocks)] = True
    dense = dense[..., :blocks]
    counts = dense.sum(-1).int()
    indices = torch.argsort(dense.int(), dim=-1, descending=True, stable=True).int()
    mask_mod = (lambda b, hh, q_idx, kv_idx: q_idx >= kv_idx) if causal else None
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(length, length))


def methods(op, causal, length, q, k, v, device):
    """name -> fn(q, k, v) returning the attention output."""
    scaling = q.shape[-1] ** -0.5
    with torch.no_grad():
        selection = op(q, k, v, None, scaling).selection  # need_probs keeps the whole selection
    found = {
        "sea": lambda q, k, v: op(q, k, v, None, scaling, need_probs=False).context,
        "sea_sparse_only": lambda q, k, v: sparse_attention_triton(q, k, v, selection, scaling, need_probs=False)[1],
    }

    def sdpa(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return attend

    found.update({name: sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    if causal:  # built from its blocks: create_block_mask evaluates T x T entries (128 GiB at 128k)
        blocks = length // FLEX_BLOCK
        counts = torch.arange(1, blocks + 1, dtype=torch.int32, device=device)[None, None]
        indices = torch.arange(blocks, dtype=torch.int32, device=device).expand(1, 1, blocks, blocks)
        mask = BlockMask.from_kv_blocks(counts, indices.contiguous(), BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, seq_lengths=(length, length))
        found["flex"] = lambda q, k, v: compiled(q, k, v, block_mask=mask)
    else:
        found["flex"] = lambda q, k, v: compiled(q, k, v)
    sea_mask = flex_block_mask(selection, causal, length, device)
    found["flex_sea_mask"] = lambda q, k, v: compiled(q, k, v, block_mask=sea_mask)
    if length <= 16384:
        def eager(q, k, v):
            scores = (q @ k.transpose(-1, -2)) * scaling
            if causal:
                scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool, device=device).triu(1), -math.inf)
            return torch.softmax(scores.float(), -1).to(v.dtype) @ v
        found["eager"] = eager
    return found


def benchmark(lengths, shapes, masks, chosen, budget, width, block, repeats, device):
    rows = []
    for heads, head_dim in shapes:
        for causal in [mask == "causal" for mask in masks]:
            op = sea_layer(heads, head_dim, causal, "auto", budget, width, block, device).to(torch.bfloat16)
            for length in lengths:
                q, k, v = (torch.randn(1, heads, length, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
                for name, fn in methods(op, causal, length, q, k, v, device).items():
                    if name not in chosen:
                        continue
                    for mode in ("forward", "forward+backward"):
                        inputs = [x.clone().requires_grad_(mode != "forward") for x in (q, k, v)]

                        def step():
                            if mode == "forward":
                                with torch.no_grad():
                                    fn(*inputs)
                            else:
                                fn(*inputs).float().square().mean().backward()

                        try:
                            ms, mb = timed(step, repeats)
                        except Exception as error:  # out of memory, or a compile failure: recorded, not fatal
                            print(f"{name} {mode} T={length}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                            ms, mb = float("nan"), float("nan")
                        torch.cuda.empty_cache()
                        rows.append({"heads": heads, "head_dim": head_dim, "causal": causal, "length": length,
                                     "method": name, "mode": mode, "ms": ms, "peak_mb": mb})
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def with_ratios(rows):
    """Each row with its time over the fastest dense method's on the same problem (< 1: faster than every dense
    method measured) and its peak memory over the leanest one's; NaN where no dense method ran."""
    key = ("heads", "head_dim", "causal", "mode", "length")
    dense = {}
    for row in rows:
        if row["method"] in DENSE_METHODS and math.isfinite(row["ms"]):
            dense.setdefault(tuple(row[k] for k in key), []).append(row)
    for row in rows:
        rivals = dense.get(tuple(row[k] for k in key), [])
        fastest = min(rivals, key=lambda r: r["ms"], default=None)
        row["fastest_dense"] = fastest["method"] if fastest else None
        row["time_vs_fastest_dense"] = row["ms"] / fastest["ms"] if fastest else math.nan
        leanest = min((r["peak_mb"] for r in rivals), default=math.nan)
        row["memory_vs_leanest_dense"] = row["peak_mb"] / max(leanest, 1e-9)
    return rows


def print_table(rows):
    print("\n| heads x dim | causal | mode | T | method | ms | peak MB | fastest dense | time / fastest dense "
          "| memory / leanest dense |")
    print("|---" * 10 + "|")
    for r in rows:
        print(f"| {r['heads']}x{r['head_dim']} | {r['causal']} | {r['mode']} | {r['length']} | {r['method']} | "
              f"{r['ms']:.2f} | {r['peak_mb']:.0f} | {r['fastest_dense']} | {r['time_vs_fastest_dense']:.2f} "
              f"| {r['memory_vs_leanest_dense']:.2f} |")


def plot(rows, folder):
    """One PNG per head shape: time and memory against T for every method, one panel per (causal, mode) measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for heads, head_dim in sorted({(r["heads"], r["head_dim"]) for r in rows}):
        measured = {(r["causal"], r["mode"]) for r in rows if (r["heads"], r["head_dim"]) == (heads, head_dim)}
        panels = [(c, m) for c in (True, False) for m in ("forward", "forward+backward") if (c, m) in measured]
        figure, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
        for column, (causal, mode) in enumerate(panels):
            chosen = [r for r in rows if (r["heads"], r["head_dim"], r["causal"], r["mode"]) == (heads, head_dim, causal, mode)]
            for method in dict.fromkeys(r["method"] for r in chosen):
                points = [(r["length"], r["ms"], r["peak_mb"]) for r in chosen if r["method"] == method]
                lengths, ms, mb = zip(*points)
                axes[0, column].plot(lengths, ms, marker="o", label=method)
                axes[1, column].plot(lengths, mb, marker="o", label=method)
            for row, label in ((0, "median ms"), (1, "peak MB")):
                axes[row, column].set(xscale="log", yscale="log", xlabel="tokens", ylabel=label,
                                      title=f"{'causal' if causal else 'bidirectional'}, {mode}")
        axes[0, 0].legend(fontsize=8)
        figure.suptitle(f"one attention layer, {heads} heads x {head_dim}, bf16")
        figure.tight_layout()
        figure.savefig(f"{folder}/attention_{heads}x{head_dim}.png", dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--shapes", nargs="+", default=["12x64", "32x128"], help="heads x head_dim")
    parser.add_argument("--masks", nargs="+", default=["causal", "bidirectional"], choices=["causal", "bidirectional"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help=f"at least one dense method ({', '.join(DENSE_METHODS)}): every ratio is to them")
    parser.add_argument("--key-budget", type=int, default=1024)
    parser.add_argument("--width", type=int, default=128, help="sea_compressed_width (M)")
    parser.add_argument("--query-block", type=int, default=64, help="sea_query_block_size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--check-budget", type=int, help="key budget of the check (default: --key-budget); the "
                        "float32 reference keeps every gathered key for its gradients, so large shapes need less")
    parser.add_argument("--json")
    parser.add_argument("--plots", help="folder for the PNG plots")
    args = parser.parse_args()
    if not set(args.methods) & set(DENSE_METHODS):
        parser.error(f"--methods needs a dense method to compare with: one of {DENSE_METHODS}")
    device = torch.device("cuda")
    torch.manual_seed(0)
    # FlexAttention compiles once per shape, mask and grad mode: without room for that many, dynamo falls back
    # to the unfused implementation, which materialises the T x T scores.
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 10_000
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    print(f"SEA: key budget {args.key_budget}, M {args.width}, query blocks of {args.query_block}")
    print("kernel check (bf16 Triton vs float32 PyTorch, relative L2 error):")
    checks = check_kernels(device, *shapes[0], args.check_budget or args.key_budget, args.width, args.query_block,
                           args.check_length)
    rows = with_ratios(benchmark(args.lengths, shapes, args.masks, set(args.methods), args.key_budget, args.width,
                                 args.query_block, args.repeats, device))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "key_budget": args.key_budget,
                       "width": args.width, "query_block": args.query_block, "check": checks, "rows": rows}, f, indent=1)
    if args.plots:
        plot(rows, args.plots)


if __name__ == "__main__":
    main()
