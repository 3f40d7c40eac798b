"""`torch.export` of SEA models: the exported program computes what the eager model does, and what cannot export
(a cache, a dynamic sequence length) is refused with an error that says what to change."""

import pytest
import torch
from conftest import TINY_LLAMA, TINY_OPT, sea_test_config

from sea.configuration_sea import SEA_FAMILIES
from sea.modeling_sea import converted_class

# A budget below the length, and candidates of the default re-ranking ((4 + 1) x 8 keys) too, so that the selection
# (sized by its bound in the graph) leaves keys out.
SEA = dict(sea_key_budget=8, sea_compressed_width=16)
LENGTH = 48


def tiny_model(model_type: str, **sea):
    """The SEA model of a registered family at its test shape, randomly initialised."""
    torch.manual_seed(0)
    return converted_class(SEA_FAMILIES[model_type])(sea_test_config(model_type, **SEA, **sea)).eval()


def random_ids(seed: int) -> torch.Tensor:
    return torch.randint(1, TINY_OPT["vocab_size"], (2, LENGTH), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "model_type, sea",
    [(model_type, {}) for model_type in SEA_FAMILIES] + [("llama", {"sea_query_block_size": 16}),
                                                        ("llama", {"sea_bin_ranking": "estimate", "sea_candidate_factor": 1})],
    ids=[*SEA_FAMILIES, "llama-query-blocks", "llama-estimate"],
)
def test_exported_program_matches_eager(model_type, sea):
    model = tiny_model(model_type, **sea)
    program = torch.export.export(model, (random_ids(0),))
    ids = random_ids(1)  # fresh ids: the graph holds no value of the ids it was traced with
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_exported_program_takes_a_padding_mask():
    model = tiny_model("llama")
    ids = random_ids(0)
    traced_mask, mask = torch.ones_like(ids), torch.ones_like(ids)
    traced_mask[0, :5] = 0
    mask[1, :9] = 0  # other padding than when traced: the mask is an input, not a constant
    program = torch.export.export(model, (ids,), {"attention_mask": traced_mask})
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
            rtol=1e-5, atol=1e-5,
        )


def test_export_refuses_a_cache():
    with pytest.raises(ValueError, match="export without a cache.*use_cache=False"):
        torch.export.export(tiny_model("opt"), (random_ids(0),), {"use_cache": True})


def test_export_refuses_a_dynamic_sequence_length():
    length = torch.export.Dim("length", max=TINY_LLAMA["max_position_embeddings"])
    with pytest.raises(ValueError, match="static sequence length.*without `dynamic_shapes`"):
        torch.export.export(tiny_model("llama"), (random_ids(0),), dynamic_shapes=({1: length},))
