"""Time per generated token and cache bytes per token: SeaOptForCausalLM (SeaCache) vs dense OPT (SDPA) with
transformers' default DynamicCache and with its preallocated StaticCache, same shapes.

The caches are filled to each context length directly (random keys, values and SEA state: the cost of a decode
step does not depend on their values), then `--steps` single-token forwards are timed and the median reported.

    python benchmarks/decode.py [--contexts 1024 4096 16384 65536] [--layers 4] [--device cpu] [--profile]

`--profile`: also where one decode step of each model spends its host time (torch.profiler, largest context).
"""

import argparse
import json
import time

import torch
from transformers import DynamicCache, OPTConfig, OPTForCausalLM, StaticCache

from conversion.convert import convert_to_sea
from sea.configuration_sea import SeaConfigMixin
from sea.modeling_sea import CACHE_NAME
from sea.sea_cache import SeaCache


def build_models(layers: int, max_positions: int, device: str, dtype: torch.dtype, sea_options: dict):
    config = OPTConfig(hidden_size=768, num_attention_heads=12, ffn_dim=3072, num_hidden_layers=layers,
                       max_position_embeddings=max_positions)
    dense = OPTForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    sea = convert_to_sea(dense, **sea_options)
    return dense.to(device, dtype), sea.to(device, dtype)


def filled_cache(model, context: int, device: str, dtype: torch.dtype, static_room: int | None = None):
    """A cache holding `context` tokens for every layer of `model`: a SeaCache for SEA models, else a DynamicCache,
    or a StaticCache with room for `static_room` more tokens."""
    config = model.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    is_sea = isinstance(config, SeaConfigMixin)
    if is_sea:
        cache = SeaCache(config)
    elif static_room is not None:
        cache = StaticCache(config=config, max_cache_len=context + static_room)
    else:
        cache = DynamicCache()
    for index, layer in enumerate(model.model.decoder.layers):
        keys, values = torch.randn(2, 1, heads, context, head_dim, device=device, dtype=dtype).unbind(0)
        cache.update(keys, values, index)
        if is_sea:
            state = layer.self_attn.sea.initial_state(1, dtype, device)
            cache.set_sea_state(index, state.map(lambda t: torch.rand_like(t) * context))
    if is_sea:
        cache.key_valid = torch.ones(1, context, dtype=torch.bool, device=device)
    return cache


def cache_bytes(cache, context: int) -> int:
    """Bytes per cached token (a StaticCache's room for later tokens is not counted)."""
    tensors = [t[..., :context, :] for layer in cache.layers for t in (layer.keys, layer.values)]
    if isinstance(cache, SeaCache):
        tensors += [cache.key_valid] + [getattr(s, f) for s in cache.sea_states.values() for f in s.__dataclass_fields__]
    return sum(t.numel() * t.element_size() for t in tensors)


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(model, context: int, steps: int, device: str, dtype: torch.dtype, static: bool = False,
                profile: bool = False):
    """Median seconds per decode step and cache bytes per token; with `profile`, prints where the last step's host
    time went. The first step is a warm-up: for a SeaCache filled to exactly `context` it is also the step that
    regrows the buffers (with room for context / 8 more tokens), a copy a real decode pays once per that many
    tokens."""
    cache = filled_cache(model, context, device, dtype, steps + 2 if static else None)
    per_token = cache_bytes(cache, context) / context
    token = torch.randint(3, 1000, (1, 1), device=device)
    times = []
    for step in range(steps + 1):  # the first step warms up
        mask = torch.ones(1, context + step + 1, dtype=torch.long, device=device)
        synchronize(device)
        start = time.perf_counter()
        logits = model(token, attention_mask=mask, use_cache=True, **{CACHE_NAME: cache}).logits
        synchronize(device)
        times.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1)
    if profile:
        from torch.profiler import profile as profiler

        mask = torch.ones(1, context + steps + 2, dtype=torch.long, device=device)
        with profiler() as prof:
            model(token, attention_mask=mask, use_cache=True, **{CACHE_NAME: cache})
            synchronize(device)
        print(f"{model.config.model_type}, {type(cache).__name__}, context {context}: one decode step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    return sorted(times[1:])[steps // 2], per_token


@torch.no_grad()
def time_attention_step(sea_model, context: int, steps: int, device: str, dtype: torch.dtype) -> tuple[float, float]:
    """The attention part of one decode step alone, over keys and values already in place: dense SDPA over the
    whole context vs SEA (estimate from the cached state, top-k, gather of the selected keys)."""
    layer = sea_model.model.decoder.layers[0].self_attn.sea
    heads, head_dim = layer.num_heads, layer.head_dim
    query = torch.randn(1, heads, 1, head_dim, device=device, dtype=dtype)
    keys, values = torch.randn(2, 1, heads, context + 1, head_dim, device=device, dtype=dtype).unbind(0)
    key_valid = torch.ones(1, context + 1, dtype=torch.bool, device=device)
    state = layer.initial_state(1, dtype, device).map(lambda t: torch.rand_like(t) * context)
    steps_of = {
        "dense": lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values),
        "sea": lambda: layer(query, keys, values, key_valid, 1.0, state=state, need_probs=False),
    }
    medians = []
    for run in steps_of.values():
        times = []
        for _ in range(steps + 1):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - start)
        medians.append(sorted(times[1:])[steps // 2])
    return tuple(medians)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (opt-125m widths: 12 x 64 heads)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--key-budget", type=int, default=64)
    parser.add_argument("--width", type=int, default=128, help="sea_compressed_width (M)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--profile", action="store_true", help="profile one step of each model at the largest context")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    dense, sea = build_models(args.layers, max(args.contexts) + args.steps + 2, args.device, dtype,
                              {"sea_key_budget": args.key_budget, "sea_compressed_width": args.width})
    rows = []
    for context in args.contexts:
        profile = args.profile and context == max(args.contexts)
        dense_s, dense_bytes = time_decode(dense, context, args.steps, args.device, dtype)
        static_s, _ = time_decode(dense, context, args.steps, args.device, dtype, static=True, profile=profile)
        sea_s, sea_bytes = time_decode(sea, context, args.steps, args.device, dtype, profile=profile)
        dense_attn, sea_attn = time_attention_step(sea, context, 4 * args.steps, args.device, dtype)
        rows.append({"context": context, "dense_ms": dense_s * 1e3, "dense_static_ms": static_s * 1e3,
                     "sea_ms": sea_s * 1e3, "dense_attention_ms": dense_attn * 1e3, "sea_attention_ms": sea_attn * 1e3,
                     "dense_cache_bytes_per_token": dense_bytes, "sea_cache_bytes_per_token": sea_bytes})
    print(f"decode, {args.layers} layers x 12 heads x 64, {args.dtype}, batch 1, device {args.device}, "
          f"SEA key budget {args.key_budget}, M {args.width}")
    print("| context | dense ms/token: DynamicCache | StaticCache | SEA ms/token | dense Dynamic / SEA "
          "| dense Static / SEA | attention only: SDPA ms | SEA ms | dense cache B/token | SEA cache B/token |")
    print("|---" * 10 + "|")
    for r in rows:
        print(f"| {r['context']} | {r['dense_ms']:.1f} | {r['dense_static_ms']:.1f} | {r['sea_ms']:.1f} "
              f"| {r['dense_ms'] / r['sea_ms']:.2f} | {r['dense_static_ms'] / r['sea_ms']:.2f} "
              f"| {r['dense_attention_ms']:.2f} | {r['sea_attention_ms']:.2f} "
              f"| {r['dense_cache_bytes_per_token']:.0f} | {r['sea_cache_bytes_per_token']:.0f} |")
    print("DynamicCache (transformers' default) concatenates: every step copies every layer's keys and values. "
          "StaticCache and SeaCache write in place; 'attention only' is one layer's attention over keys in place.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
