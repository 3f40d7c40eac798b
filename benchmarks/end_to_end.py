"""End to end, as a user runs it: prefill and decode of dense causal LMs and of their SEA conversions, through the
public API only (`model(ids)`, `model.generate()`), with random weights built from configs (nothing downloaded).

Shapes: SmolLM2-135M (Llama: 30 layers, 9 query / 3 key-value heads of 64), a 1B Llama (Llama-3.2-1B: 16 layers,
32 / 8 heads of 64) and opt-1.3b (24 layers, 32 heads of 64). Every model gets max_position_embeddings =
--max-positions (the longest length plus room for the new tokens): opt-1.3b's learned position table, 2048 rows in
the real checkpoint, is extended to that (a lookup: its size costs no time); no SEA weight depends on it (the memory
ratio below leaves the weights out).

Variants (a cell is one shape, batch, length, mode and variant):
- sdpa_flash, sdpa_cudnn, sdpa_math: the dense model with attn_implementation="sdpa", every call under
  `torch.nn.attention.sdpa_kernel(<that backend alone>)`; decode is generate's default (DynamicCache). A backend
  that cannot run on this device and dtype is skipped with the reason printed (math is for machines without the
  others: on a GPU it builds the T x T scores).
- flex_attention: the dense model with transformers' FlexAttention integration (`set_attn_implementation(
  "flex_attention")`, which compiles the flex kernel); measured on CUDA devices only.
- static_compiled (decode only): transformers' documented fast generation, `generate(...,
  cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))`: a
  StaticCache and the decode step compiled with CUDA graphs (the prefill runs uncompiled, as generate does it);
  SDPA picks its own backend (the static cache's mask rules flash out). transformers compiles only on
  accelerators: on the CPU this is the StaticCache alone, and each cell records whether generate compiled.
- sea: `convert_to_sea(dense, sea_key_budget=--key-budget)`, every other SEA setting at its default; decode is
  plain generate with SEA's own growing SeaCache.
- sea_grouped: the same model with `config.sea_group_selection = True` (set on the loaded model's config, as a user
  would: the field is read at every call): one selection per key/value group, whose query heads the sparse kernel
  serves with each selected key loaded once.
- sea_estimate: the same model ranking bins by SEA's estimate, without re-ranking (`sea_bin_ranking="estimate"`,
  `sea_candidate_factor=1`): the paper's selection, which the default replaced because it retrieves nothing
  (`benchmarks/results/retrieval_smollm2.md`); what the re-ranked default costs.
- sea_static_compiled, sea_grouped_static_compiled (decode only): those two with static_compiled's generate
  options: a SeaStaticCache and the decode step compiled with CUDA graphs.

Prefill: `model(ids, logits_to_keep=1)`, the last token's logits, with the model's default use_cache (the cache a
generation starts from is built too); median of --repeats calls after a warm-up call.
Decode, ms per new token after the prompt: one generate(N new tokens), N = --new-tokens, with a streamer (the public
`BaseStreamer`) noting the host time at which generate hands over each new token (it copies the tokens to the host
first, so the device has produced them): (t(token N) - t(token 1)) / (N - 1), the median of --repeats calls after a
warm-up call (which also compiles). No prefill time is subtracted, so the prefill's noise does not enter the
per-token time. The per-step copy is no extra wait: on CUDA, generate's stopping check reads the device every step
anyway. EOS is disabled so that every call makes exactly N tokens. The cell also keeps the time to the first token.
Peak memory: `torch.cuda.max_memory_allocated` over the timed calls after `reset_peak_memory_stats`, with only the
measured model on the GPU; the cell also keeps what was allocated when it started (the weights, and whatever an
earlier cell's generate left behind) and the weights alone (`get_memory_footprint()`).
Ratios, per cell against the dense variants of the same shape, batch, length and mode measured in this work dir:
speed-up = the fastest dense variant's time / this variant's (> 1: faster than every dense variant), memory = this
variant's peak above its start / the smallest such dense one.

Every cell is stored in --work-dir when measured and skipped when present, so runs split by --shapes, --lengths,
--batches, --modes and --variants (or cut at --time-limit, after which no cell starts) add up to one report, written
from every cell stored there. A cell that runs out of memory is stored as oom; one whose warm-up and one timed call
(estimated by the warm-up's time) would exceed --cell-time-limit as over time (fewer than --repeats calls run when
they would not fit); one that an earlier run entered and never left (killed at its call's limit) as
unfinished: delete its file to measure it again. A cell takes about --cell-time-limit at most (unless its warm-up
alone takes longer), so a call limited to S seconds should pass --time-limit S - 60 - --cell-time-limit (60 s for
the start and the models).

    python benchmarks/end_to_end.py                                     # every cell (hours on one H200)
    python benchmarks/end_to_end.py --shapes llama-1b --batches 1 --cell-time-limit 150 --time-limit 330
                                                         # a call of < 9 min; the same again until no cell is left
    python benchmarks/end_to_end.py --report-only                       # the report of the stored cells, anywhere
    python benchmarks/end_to_end.py --smoke                             # CPU, tiny shapes, float32: seconds
"""

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode import synchronize
from quality import run_record
from retrieval import measure_cell

from conversion.convert import convert_to_sea
from sea.configuration_sea import SeaConfigMixin

# name -> (dense class, its config fields); the tiny ones are the --smoke shapes.
SHAPES = {
    "smollm2-135m": (LlamaForCausalLM, {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True}),
    "llama-1b": (LlamaForCausalLM, {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 8192, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    "opt-1.3b": (OPTForCausalLM, {
        "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192, "vocab_size": 50272,
        "word_embed_proj_dim": 2048}),
    "tiny-llama": (LlamaForCausalLM, {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 128}),
    "tiny-opt": (OPTForCausalLM, {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128, "vocab_size": 128,
        "word_embed_proj_dim": 64}),
}
GPU_SHAPES = ("smollm2-135m", "llama-1b", "opt-1.3b")
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_math": SDPBackend.MATH}
# SEA variant -> the SEA settings it sets on the converted model's config (every one that any variant changes, so
# that the variants measured one after the other on one model do not inherit each other's); every other variant is
# dense.
DEFAULT_SELECTION = {"sea_bin_ranking": SeaConfigMixin.sea_bin_ranking,
                     "sea_candidate_factor": SeaConfigMixin.sea_candidate_factor, "sea_group_selection": False}
SEA_VARIANTS = {"sea": DEFAULT_SELECTION, "sea_grouped": {**DEFAULT_SELECTION, "sea_group_selection": True},
                "sea_estimate": {**DEFAULT_SELECTION, "sea_bin_ranking": "estimate", "sea_candidate_factor": 1},
                "sea_static_compiled": DEFAULT_SELECTION,
                "sea_grouped_static_compiled": {**DEFAULT_SELECTION, "sea_group_selection": True}}
# The decode variants that generate with a static cache and the decode step compiled.
STATIC_COMPILED = ("static_compiled", "sea_static_compiled", "sea_grouped_static_compiled")
# mode -> its variants.
VARIANTS = {"prefill": ("sdpa_flash", "sdpa_cudnn", "sdpa_math", "flex_attention", "sea", "sea_grouped", "sea_estimate"),
            "decode": ("sdpa_flash", "sdpa_cudnn", "sdpa_math", "flex_attention", *STATIC_COMPILED[:1],
                       *SEA_VARIANTS)}
ALL_VARIANTS = tuple(dict.fromkeys(v for variants in VARIANTS.values() for v in variants))
SMOKE_DEFAULTS = {  # the grouped variants differ by a config field only: the smoke run keeps to the per-head ones
    "shapes": ["tiny-llama", "tiny-opt"], "lengths": [48, 96], "batches": [1, 2],
    "variants": [v for v in ALL_VARIANTS if "grouped" not in v],
    "dtype": "float32", "device": "cpu", "key_budget": 16, "new_tokens": 4, "repeats": 1, "max_positions": 128,
    "work_dir": "outputs/end-to-end-smoke", "output": "outputs/end-to-end-smoke/end_to_end_smoke",
}
OUT_OF_TIME = "over time"


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(GPU_SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--variants", nargs="+", default=[v for v in ALL_VARIANTS if v != "sdpa_math"],
                        choices=ALL_VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--key-budget", type=int, default=1024, help="sea_key_budget of the SEA conversion")
    parser.add_argument("--new-tokens", type=int, default=32, help="N of the decode measurement (at least 2)")
    parser.add_argument("--max-positions", type=int, default=131072 + 64, help="max_position_embeddings of every model")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (medians)")
    parser.add_argument("--cell-time-limit", type=float, default=300.0,
                        help="seconds one cell may take (its warm-up is the estimate of each timed call)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; no cell starts after this")
    parser.add_argument("--work-dir", default="outputs/end-to-end")
    parser.add_argument("--output", default="benchmarks/results/end_to_end_h200", help="report path without suffix")
    parser.add_argument("--report-only", action="store_true", help="write the report from the stored cells only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=f"tiny CPU defaults: {SMOKE_DEFAULTS}")
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke defaults, under any flag given explicitly
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode is timed over N - 1 steps")
    if max(args.lengths) + args.new_tokens > args.max_positions:
        parser.error(f"--max-positions {args.max_positions} leaves no room for {args.new_tokens} new tokens after "
                     f"{max(args.lengths)}")
    return args


def backend_problem(variant: str, device: str, dtype: torch.dtype) -> str | None:
    """Why a dense variant cannot run here (for SDPA: a tiny causal call under its backend alone fails), else None."""
    if variant == "flex_attention" and not device.startswith("cuda"):
        return "FlexAttention is measured on CUDA devices only"
    if variant not in SDPA_BACKENDS:
        return None
    probe = torch.randn(1, 2, 8, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPA_BACKENDS[variant]):
            torch.nn.functional.scaled_dot_product_attention(probe, probe, probe, is_causal=True)
    except RuntimeError as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def dense_model(shape: str, max_positions: int, device: str, dtype: torch.dtype):
    """The dense model of `shape` with random weights, built on `device` (a 1B model initialised on the CPU takes
    longer than its cells), SDPA attention, EOS off so that generate makes exactly the tokens asked."""
    model_class, fields = SHAPES[shape]
    config_class = LlamaConfig if model_class is LlamaForCausalLM else OPTConfig
    config = config_class(**fields, max_position_embeddings=max_positions, pad_token_id=0)
    with torch.device(device):
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    return without_eos(model)


def without_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def sea_model(dense, key_budget: int, device: str):
    """SEA's conversion of `dense` at its default settings but the key budget, built on `device` like the dense."""
    with torch.device(device):
        return without_eos(convert_to_sea(dense, sea_key_budget=key_budget))


def cell_name(key: dict) -> str:
    return f"{key['shape']}-b{key['batch']}-{key['length']}-{key['mode']}-{key['variant']}"


def cell_path(work: Path, key: dict) -> Path:
    return work / "cells" / f"{cell_name(key)}.json"


def cell_plan(args):
    """The key of every cell the filters ask for, per shape: the dense variants first, then SEA (one model on the
    device at a time)."""
    for shape in args.shapes:
        for dense in (True, False):
            for batch in args.batches:
                for length in args.lengths:
                    for mode in args.modes:
                        for variant in VARIANTS[mode]:
                            if variant in args.variants and (variant not in SEA_VARIANTS) == dense:
                                yield {"shape": shape, "batch": batch, "length": length, "mode": mode, "variant": variant}


def measured_once(path: Path, key: dict, measure) -> dict:
    """`retrieval.measure_cell` with a marker file while measuring: a cell that an earlier run entered and never
    left (killed at its call's time limit, or the process died in it) is stored as unfinished instead of being tried
    again in every run."""
    started = path.with_suffix(".started")
    if not path.exists():
        if started.exists():
            measure = partial(dict, status="unfinished")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            started.touch()
    result = measure_cell(path, lambda: {**key, **measure()})
    started.unlink(missing_ok=True)
    return result


class OverTime(Exception):
    pass


def median_seconds(call, repeats: int, limit: float, device: str) -> dict:
    """The median of each of the seconds `call()` returns over `repeats` calls (or as many as fit in `limit`
    seconds, at least one) after a warm-up call, the peak memory of the timed calls and the memory allocated before.
    OverTime when the warm-up and one timed call, as long as the warm-up, would not fit in `limit`."""
    start_mb = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None
    start = time.perf_counter()
    call()
    warm = time.perf_counter() - start
    if 2 * warm > limit:
        raise OverTime(f"warm-up {warm:.0f} s: with one timed call about {2 * warm:.0f} s > {limit:.0f} s")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timed = []
    while len(timed) < repeats:
        call_start = time.perf_counter()
        timed.append(call())
        now = time.perf_counter()
        if now - start + (now - call_start) > limit:  # another call would pass the limit
            break
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"seconds": {name: statistics.median(t[name] for t in timed) for name in timed[0]}, "timed_calls": len(timed),
            "peak_mb": peak, "start_mb": start_mb}


class TokenClock(BaseStreamer):
    """The host time at which generate hands over the prompt, then each new token: it puts them on the host first,
    so each time is after the device produced that token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def prefill_call(model, ids, device: str):
    def call():
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, logits_to_keep=1)
        synchronize(device)
        return {"prefill": time.perf_counter() - start}
    return call


def decode_call(model, ids, new_tokens: int, static: bool):
    """generate(new_tokens): the seconds to its first new token and per new token after it (timed by a TokenClock)."""
    options = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "do_sample": False}
    if static:
        options.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))

    def call():
        clock = TokenClock()
        start = time.perf_counter()
        out = model.generate(ids, streamer=clock, **options)
        if out.shape[1] != ids.shape[1] + new_tokens or len(clock.times) != 1 + new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
        first, last = clock.times[1], clock.times[-1]
        return {"first_token": first - start, "per_token": (last - first) / (new_tokens - 1)}
    return call


@contextlib.contextmanager
def flex_attention(model):
    """The dense model with transformers' FlexAttention (`set_attn_implementation`) inside, SDPA again after."""
    model.set_attn_implementation("flex_attention")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def variant_context(model, variant: str):
    """What a dense variant's calls run under: its SDPA backend alone, FlexAttention, or nothing."""
    if variant in SDPA_BACKENDS:
        return sdpa_kernel(SDPA_BACKENDS[variant])
    if variant == "flex_attention":
        return flex_attention(model)
    return contextlib.nullcontext()


def measure(model, key: dict, args, device: str) -> dict:
    """One cell's times and memory (see the module docstring for what each mode measures)."""
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, model.config.vocab_size, (key["batch"], key["length"]), generator=generator).to(device)
    static = key["variant"] in STATIC_COMPILED
    # No compiled graph (nor its CUDA-graph memory) of an earlier cell: the static cells compile for their own shapes,
    # as in a user's process.
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prefill = key["mode"] == "prefill"
    call = prefill_call(model, ids, device) if prefill else decode_call(model, ids, args.new_tokens, static)
    with variant_context(model, key["variant"]):
        got = median_seconds(call, args.repeats, args.cell_time_limit, device)
    seconds = got.pop("seconds")
    result = {"status": "ok", "weights_mb": model.get_memory_footprint() / 2**20, **got}
    if prefill:
        return {**result, "ms": seconds["prefill"] * 1e3}
    # Whether generate compiled: the graphs dynamo captured in this cell (transformers compiles only on accelerators).
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before
    return {**result, "ms": seconds["per_token"] * 1e3, "first_token_ms": seconds["first_token"] * 1e3,
            "compiled": compiled}


def measured_or_failed(model, key: dict, args, device: str) -> dict:
    """`measure`, with running out of memory or time, or any other failure (an unsupported backend), recorded."""
    try:
        return measure(model, key, args, device)
    except torch.OutOfMemoryError as error:
        return {"status": "oom", "error": str(error).splitlines()[0]}
    except OverTime as error:
        return {"status": OUT_OF_TIME, "error": str(error)}
    except Exception as error:  # noqa: BLE001 - a failed cell is a result, not the end of the run
        return {"status": "error", "error": f"{type(error).__name__}: {str(error)[:500]}"}
    finally:
        if device.startswith("cuda"):  # hand back what a failed cell's frames held, before the next one
            gc.collect()
            torch.cuda.empty_cache()


def run_cells(args, work: Path) -> dict:
    """Measure every planned cell not yet stored, until --time-limit; returns variant -> why it was skipped."""
    dtype = getattr(torch, args.dtype)
    skipped = {v: problem for v in args.variants if (problem := backend_problem(v, args.device, dtype))}
    for variant, problem in skipped.items():
        print(f"skipping {variant}: unavailable on {args.device} in {args.dtype} ({problem})", flush=True)
    deadline = time.time() + args.time_limit if args.time_limit else None
    for shape in args.shapes:
        pending = [key for key in cell_plan(args) if key["shape"] == shape and key["variant"] not in skipped
                   and not cell_path(work, key).exists()]
        if pending and not run_shape(shape, pending, args, work, deadline):
            print(f"--time-limit {args.time_limit:.0f} s reached: the remaining cells are left for a later run")
            break
    return skipped


def run_shape(shape: str, pending: list[dict], args, work: Path, deadline: float | None) -> bool:
    """Measure `pending` (cells of `shape`, dense first) on one model at a time; False when the deadline stopped it."""
    torch.manual_seed(args.seed)  # the same random weights in every run, for the dense model and so for SEA's
    model, is_sea = dense_model(shape, args.max_positions, args.device, getattr(torch, args.dtype)), False
    for key in pending:
        if deadline is not None and time.time() > deadline:
            return False
        if key["variant"] in SEA_VARIANTS:
            if not is_sea:  # the dense cells are done: the dense model is dropped
                model, is_sea = sea_model(model, args.key_budget, args.device), True
                gc.collect()
            for name, value in SEA_VARIANTS[key["variant"]].items():
                setattr(model.config, name, value)
        result = measured_once(cell_path(work, key), key, partial(measured_or_failed, model, key, args, args.device))
        print(json.dumps(result), flush=True)
    return True


def checked_settings(args, work: Path) -> dict:
    """The settings every stored cell was measured with: those of the first run in `work`; a later run with other
    settings would mix incomparable cells, so it is refused."""
    settings = {"dtype": args.dtype, "device": args.device, "key_budget": args.key_budget, "new_tokens": args.new_tokens,
                "max_positions": args.max_positions, "seed": args.seed}
    path = work / "settings.json"
    if not path.exists():
        path.write_text(json.dumps(settings, indent=1))
    stored = json.loads(path.read_text())
    if stored != settings:
        raise SystemExit(f"{work} holds cells measured with {stored}, not {settings}: use another --work-dir")
    return stored


def stored_cells(work: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((work / "cells").glob("*.json"))]


def with_ratios(cells: list[dict]) -> list[dict]:
    """Each cell with its speed-up over the fastest dense variant of the same shape, batch, length and mode, and its
    peak memory above its start over the smallest such dense one (None where either side is missing)."""
    def problem(cell):
        return cell["shape"], cell["batch"], cell["length"], cell["mode"]

    dense = {}
    for cell in cells:
        if cell["variant"] not in SEA_VARIANTS and cell["status"] == "ok":
            dense.setdefault(problem(cell), []).append(cell)
    for cell in cells:
        rivals, ok = dense.get(problem(cell), []), cell["status"] == "ok"
        cell["speedup_vs_fastest_dense"] = min(r["ms"] for r in rivals) / cell["ms"] if ok and rivals else None
        above = [added_mb(r) for r in rivals if r["peak_mb"] is not None]
        cell["memory_vs_leanest_dense"] = (added_mb(cell) / max(min(above), 1e-9)
                                           if ok and above and cell["peak_mb"] is not None else None)
    return cells


def added_mb(cell: dict) -> float:
    """The memory a cell's calls added at their peak to what it started with."""
    return cell["peak_mb"] - cell["start_mb"]


def cell_text(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell["status"] != "ok":
        return cell["status"]
    memory = "" if cell["peak_mb"] is None else f" ({added_mb(cell):.0f} MB)"
    return f"{cell['ms']:.2f}{memory}"


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(cells: list[dict], record: dict, settings: dict, skipped: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in record["versions"].items())
    lines = [f"# End to end: dense vs SEA, {settings['dtype']}, random weights", "", f"```\n{record['command']}\n```", "",
             (f"Device: {record['device']}; {versions}; SEA key budget {settings['key_budget']}, every other SEA "
              f"setting at its default but the grouped variants' sea_group_selection=True and sea_estimate's ranking "
              f"(the estimate, no re-ranking); decode over {settings['new_tokens']} new tokens."), "",
             ("Each variant's time (ms; decode: ms per new token) with, in brackets, the memory its calls added at "
              "their peak to what the cell started with (the weights); each SEA variant's speed-up over the fastest "
              "dense variant of the row, and its added memory over the leanest dense variant's (see the docstring of "
              "benchmarks/end_to_end.py).")]
    lines += [f"Skipped: {variant} ({why})." for variant, why in skipped.items()]
    for mode, variants in VARIANTS.items():
        present = [v for v in variants if any(c["mode"] == mode and c["variant"] == v for c in cells)]
        if not present:
            continue
        seas = [v for v in present if v in SEA_VARIANTS]
        header = ("| shape | batch | T | " + " | ".join(present) + " | " +
                  " | ".join(f"{v} speed-up | {v} memory" for v in seas) + " |")
        lines += ["", f"## {mode}", "", header, "|---" * (header.count("|") - 1) + "|"]
        rows = sorted({(c["shape"], c["batch"], c["length"]) for c in cells if c["mode"] == mode})
        for shape, batch, length in rows:
            found = {c["variant"]: c for c in cells if (c["shape"], c["batch"], c["length"], c["mode"]) ==
                     (shape, batch, length, mode)}
            ratios = [ratio_text(found.get(v, {}).get(ratio)) for v in seas
                      for ratio in ("speedup_vs_fastest_dense", "memory_vs_leanest_dense")]
            lines.append(f"| {shape} | {batch} | {length} | " + " | ".join(cell_text(found.get(v)) for v in present) +
                         " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], path: Path):
    """Time against length, one panel per (mode, shape), one line per (variant, batch), one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(c["shape"] for c in cells))
    figure, axes = plt.subplots(len(VARIANTS), len(shapes), figsize=(5 * len(shapes), 8), squeeze=False)
    for row, mode in enumerate(VARIANTS):
        for column, shape in enumerate(shapes):
            axis = axes[row, column]
            chosen = [c for c in cells if (c["mode"], c["shape"], c["status"]) == (mode, shape, "ok")]
            for variant in VARIANTS[mode]:
                for batch in sorted({c["batch"] for c in chosen}):
                    points = sorted((c["length"], c["ms"]) for c in chosen if (c["variant"], c["batch"]) == (variant, batch))
                    if points:
                        axis.plot(*zip(*points), marker="o", color=f"C{ALL_VARIANTS.index(variant)}", label=f"{variant}, batch {batch}",
                                  linestyle="-" if batch == min(c["batch"] for c in chosen) else "--")
            axis.set_xscale("log", base=2)
            axis.set(yscale="log", xlabel="prompt tokens", title=f"{shape}, {mode}",
                     ylabel="ms" if mode == "prefill" else "ms per new token")
            if chosen:
                axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(args, work: Path, record: dict, settings: dict, skipped: dict):
    cells = with_ratios(stored_cells(work))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    body = {**record, "settings": settings, "skipped": skipped, "cells": cells}
    output.with_suffix(".json").write_text(json.dumps(body, indent=1))
    text = markdown(cells, record, settings, skipped)
    output.with_suffix(".md").write_text(text)
    print(text)
    try:
        if cells:
            plot(cells, output.with_suffix(".png"))
    except ImportError as error:  # a bare GPU machine: the PNG comes from --report-only where matplotlib is
        print(f"no PNG: {error}")


def stored_run(work: Path) -> tuple[dict, dict]:
    """The run record and the settings of the measuring runs in `work`, for a report written on another machine."""
    record, settings = work / "run.json", work / "settings.json"
    if not (record.exists() and settings.exists()):
        raise SystemExit(f"{work} holds no measured run (run.json and settings.json): nothing to report")
    return run_record(work, None, Path(__file__).name, measures=False), json.loads(settings.read_text())


def main(argv=None):
    args = parse_arguments(argv)
    work = Path(args.work_dir)
    if args.report_only:
        report(args, work, *stored_run(work), skipped={})
        return
    work.mkdir(parents=True, exist_ok=True)
    settings = checked_settings(args, work)
    record = run_record(work, argv, Path(__file__).name)
    skipped = run_cells(args, work)
    left = [key for key in cell_plan(args) if key["variant"] not in skipped and not cell_path(work, key).exists()]
    print(f"{len(left)} planned cells not measured yet" + (": run the same command again" if left else ""))
    report(args, work, record, settings, skipped)


if __name__ == "__main__":
    main()
