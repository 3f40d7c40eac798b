"""SeaOpt / SeaBert models: conversion from dense, causality, padding and batching, gradients, dtypes."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import BertForMaskedLM, BertForSequenceClassification, OPTConfig, OPTForCausalLM

from conftest import (
    OPT_125M, TINY_LLAMA, enable_checkpointing, randomize_sea_gates, sea_test_config, tiny_bert_config, tiny_opt_config,
)
from conversion.convert import convert_to_sea
from sea.configuration_sea import SEA_FAMILIES
from sea.modeling_sea import SeaBertForMaskedLM, converted_class
from sea.sea_layer import SeaAttention


def random_ids(n: int, t: int, vocab: int = 120) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t))


def converted_opt(**sea):
    dense = OPTForCausalLM(tiny_opt_config(dense=True)).eval()
    return dense, convert_to_sea(dense, **sea)


def converted_bert(**sea):
    dense = BertForSequenceClassification(tiny_bert_config(dense=True)).eval()
    return dense, convert_to_sea(dense, **sea)


def test_full_budget_conversion_equals_dense_opt_125m_shape():
    dense = OPTForCausalLM(OPTConfig(**OPT_125M)).eval()
    sea = convert_to_sea(dense, sea_key_budget=2048)
    ids = random_ids(2, 96, dense.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding, as in batched generation
    with torch.no_grad():
        expected = dense(ids, attention_mask=mask).logits
        got = sea(ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-4


def test_default_budget_attends_short_sequences_exactly():
    dense, sea = converted_opt()
    t = sea.config.sea_key_budget  # a sequence no longer than the default budget
    ids = random_ids(2, t)
    with torch.no_grad():
        torch.testing.assert_close(sea(ids).logits, dense(ids).logits, atol=1e-4, rtol=0)


def test_full_budget_conversion_equals_dense_bert():
    dense, sea = converted_bert(sea_key_budget=256)
    ids = random_ids(3, 80)
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    mask[2, :9] = 0
    with torch.no_grad():
        torch.testing.assert_close(sea(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_small_budget_outputs_finite_and_sparse_attentions_returned(family):
    dense, sea = (converted_opt if family == "opt" else converted_bert)(sea_key_budget=4, sea_compressed_width=8)
    randomize_sea_gates(sea)
    t = 90
    ids = random_ids(2, t)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    with torch.no_grad():
        out = sea(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    assert len(out.attentions) == sea.config.num_hidden_layers
    assert len(out.hidden_states) == sea.config.num_hidden_layers + 1
    for probs in out.attentions:
        assert probs.shape == (2, sea.config.num_attention_heads, t, t)
        assert ((probs > 0).sum(-1) <= 4).all(), "more keys than the budget"
        assert probs[1, :, :, :20].abs().sum() == 0, "padded keys got attention"
        if family == "opt":
            assert probs.triu(1).abs().sum() == 0, "future keys got attention"


@pytest.mark.parametrize("model_type, sea", [(model_type, {}) for model_type in SEA_FAMILIES] + [
    ("llama", {"sea_bin_ranking": "estimate", "sea_candidate_factor": 1})], ids=[*SEA_FAMILIES, "llama-estimate"])
def test_forward_compiles_into_one_graph_and_equals_eager(model_type, sea):
    """What `_can_compile_fullgraph` claims (and `torch.compile(model, fullgraph=True)` needs): a padded batch's
    forward traces into one graph with no break, and the compiled forward gives the eager logits (AOT autograd's
    eager backend: the trace inductor compiles, without its code generation). The budget leaves keys out of the
    default's candidates ((4 + 1) x 6 of 40)."""
    config = sea_test_config(model_type, sea_key_budget=6, sea_compressed_width=8, **sea)
    sea = converted_class(SEA_FAMILIES[model_type])(config).eval()
    randomize_sea_gates(sea)
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, : int(torch.randint(1, 20, ()))] = 0
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        want = sea(ids, attention_mask=mask).logits
        got = torch.compile(sea, fullgraph=True, backend=counter)(ids, attention_mask=mask).logits
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", SEA_FAMILIES)
def test_config_output_attentions_returns_the_attentions_as_the_argument_does(model_type):
    """`config.output_attentions=True` (as after `from_pretrained(..., output_attentions=True)`) returns the same
    attentions as the call argument, like transformers' own models; an explicit False in the call wins."""
    config = sea_test_config(model_type, sea_key_budget=4, sea_compressed_width=8)
    sea = converted_class(SEA_FAMILIES[model_type])(config).eval()
    ids = random_ids(2, 30)
    with torch.no_grad():
        asked = sea(ids, output_attentions=True).attentions
        sea.config.output_attentions = True
        configured = sea(ids).attentions
        declined = sea(ids, output_attentions=False).attentions
    assert len(configured) == len(asked) == sea.config.num_hidden_layers
    for got, want in zip(configured, asked):
        torch.testing.assert_close(got, want)
    assert not declined


def test_a_changed_config_acts_at_once_and_as_it_is_saved(tmp_path):
    """The SEA settings that shape no weight are read at every call: after `config.sea_key_budget = 4` the model
    reads 4 keys per query, and the saved and reloaded model computes the same logits."""
    from sea.modeling_sea import SeaOptForCausalLM

    _, sea = converted_opt(sea_key_budget=64, sea_compressed_width=8)
    randomize_sea_gates(sea)
    ids = random_ids(1, 60)
    with torch.no_grad():
        before = sea(ids).logits
        sea.config.sea_key_budget = 4
        out = sea(ids, output_attentions=True)
    assert not torch.allclose(out.logits, before)
    assert ((out.attentions[0] > 0).sum(-1) <= 4).all()
    sea.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = SeaOptForCausalLM.from_pretrained(tmp_path)(ids).logits
    torch.testing.assert_close(reloaded, out.logits)


@pytest.mark.parametrize("family", ["opt", "llama", "bert"])
def test_attention_dropout_acts_in_training_only(family):
    """The family's attention dropout (hidden dropout off) changes the outputs from call to call in train() and
    never in eval(), as in transformers' own models."""
    from conftest import TINY_BERT, TINY_OPT
    from sea.configuration_sea import SeaBertConfig, SeaLlamaConfig, SeaOptConfig
    from sea.modeling_sea import SeaBertForSequenceClassification, SeaLlamaForCausalLM, SeaOptForCausalLM

    sea_options = dict(sea_key_budget=4, sea_compressed_width=8)
    model = {
        "opt": lambda: SeaOptForCausalLM(SeaOptConfig(**{**TINY_OPT, "attention_dropout": 0.5}, **sea_options)),
        "llama": lambda: SeaLlamaForCausalLM(SeaLlamaConfig(**{**TINY_LLAMA, "attention_dropout": 0.5}, **sea_options)),
        "bert": lambda: SeaBertForSequenceClassification(
            SeaBertConfig(**{**TINY_BERT, "attention_probs_dropout_prob": 0.5}, num_labels=3, **sea_options)),
    }[family]()
    ids = random_ids(2, 30)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(ids).logits, model(ids).logits)
        model.eval()
        torch.testing.assert_close(model(ids).logits, model(ids).logits)


def test_changing_future_tokens_never_changes_earlier_logits():
    _, sea = converted_opt(sea_key_budget=5, sea_compressed_width=8)
    randomize_sea_gates(sea)
    ids = random_ids(1, 120)
    changed = ids.clone()
    cut = 57
    changed[:, cut:] = random_ids(1, 120 - cut)
    with torch.no_grad():
        a, b = sea(ids).logits, sea(changed).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,side", [("opt", "left"), ("opt", "right"), ("bert", "right")])
def test_padded_batch_equals_each_sequence_alone(family, side):
    # float64 so that rounding cannot flip a top-k choice between the batched and the single pass. BERT's
    # absolute positions are not left-padding invariant even when dense, so BERT is checked right-padded.
    _, sea = (converted_opt if family == "opt" else converted_bert)(sea_key_budget=6, sea_compressed_width=8)
    randomize_sea_gates(sea)
    sea = sea.double()
    lengths = [70, 45, 58]
    sequences = [random_ids(1, n) for n in lengths]
    t = max(lengths)
    ids = torch.full((3, t), 1)
    mask = torch.zeros(3, t, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(t - seq.shape[1], t) if side == "left" else slice(0, seq.shape[1])
        ids[row, span], mask[row, span] = seq[0], 1
    with torch.no_grad():
        batched = sea(ids, attention_mask=mask, output_hidden_states=True)
        for row, seq in enumerate(sequences):
            alone = sea(seq, output_hidden_states=True)
            got = batched.hidden_states[-1][row][mask[row].bool()]
            torch.testing.assert_close(got, alone.hidden_states[-1][0], atol=1e-8, rtol=1e-8)
            if family == "bert":  # the classifier reads the first token
                torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-8, rtol=1e-8)


def test_gradients_reach_every_sea_parameter():
    _, sea = converted_opt(sea_key_budget=6, sea_compressed_width=8)
    _, bert = converted_bert(sea_key_budget=6, sea_compressed_width=8)
    for model in (sea, bert):
        model.train()
        estimates = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: estimates.append(out.estimate_log_probs))
                 for m in model.modules() if isinstance(m, SeaAttention)]
        ids = random_ids(2, 40)
        out = model(ids, labels=ids if model is sea else torch.tensor([0, 2]))
        # The estimator is trained by distillation against the teacher's attention: stand in a random target.
        distill = sum((e.exp() * torch.randn_like(e)).sum() for e in estimates)
        (out.loss + distill).backward()
        for hook in hooks:
            hook.remove()
        sea_params = {n: p for n, p in model.named_parameters() if ".sea." in n}
        assert sea_params
        silent = [n for n, p in sea_params.items() if p.grad is None or p.grad.abs().sum() == 0]
        assert not silent, f"no gradient reached {silent}"


def test_gradient_checkpointing_matches_plain_backward():
    _, sea = converted_opt(sea_key_budget=6, sea_compressed_width=8)
    randomize_sea_gates(sea)
    sea.train()
    ids = random_ids(2, 50)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(sea)
        sea.zero_grad()
        sea(ids, labels=ids).loss.backward()
        grads.append(sea.model.decoder.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(dtype):
    dense, sea = converted_opt()
    ids = random_ids(2, 40)
    with torch.no_grad():
        reference = sea(ids).logits
        half = sea.to(dtype)(ids).logits
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.float() - reference).norm() / reference.norm() < 3e-2


def test_too_long_input_and_4d_mask_give_clear_errors():
    _, sea = converted_opt()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sea(random_ids(1, sea.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="2-D `attention_mask`"):
        sea(random_ids(1, 8), attention_mask=torch.ones(1, 1, 8, 8))


def test_masked_lm_head_loads_dense_weights_and_matches_at_full_budget():
    dense = BertForMaskedLM(tiny_bert_config(dense=True)).eval()
    sea = SeaBertForMaskedLM(tiny_bert_config(sea_key_budget=128)).eval()
    missing, unexpected = sea.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".sea." in name for name in missing)
    ids = random_ids(2, 60)
    with torch.no_grad():
        torch.testing.assert_close(sea(ids).logits, dense(ids).logits, atol=1e-4, rtol=0)


def tiny_sea_model_classes():
    from sea.configuration_sea import SeaLlamaConfig
    from sea.modeling_sea import SeaBertForSequenceClassification, SeaLlamaForCausalLM, SeaOptForCausalLM

    return {
        "opt": (SeaOptForCausalLM, lambda: tiny_opt_config(sea_key_budget=6, sea_compressed_width=8)),
        "llama": (SeaLlamaForCausalLM, lambda: SeaLlamaConfig(**TINY_LLAMA, sea_key_budget=6, sea_compressed_width=8)),
        "bert": (SeaBertForSequenceClassification, lambda: tiny_bert_config(sea_key_budget=6, sea_compressed_width=8)),
    }


@pytest.mark.parametrize("family", ["opt", "llama", "bert"])
def test_legacy_gradient_checkpointing_config_flag_turns_checkpointing_on(family):
    """A config carrying the legacy `gradient_checkpointing: true` (which transformers' own models still honour)
    enables checkpointing in every SEA class too, and is consumed as it is there: a training step then runs each
    layer's attention twice (forward, and again in backward)."""
    model_class, make_config = tiny_sea_model_classes()[family]
    config = make_config()
    config.gradient_checkpointing = True
    model = model_class(config)
    assert not hasattr(model.config, "gradient_checkpointing")
    calls = []
    sea_layer = next(m for m in model.modules() if isinstance(m, SeaAttention))
    sea_layer.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    ids = random_ids(2, 24)
    output = model(ids, labels=ids if family != "bert" else torch.tensor([0, 1]))
    assert len(calls) == 1
    output.loss.backward()
    assert len(calls) == 2


@pytest.mark.parametrize("family", ["opt", "llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_built_from_config_in_half_precision_on_the_cpu(family, dtype):
    """`from_config(config, dtype=bfloat16)` (what `AutoModel*.from_config` calls): every weight in that dtype, the
    random-feature projection still orthogonal blocks of Gaussian-norm rows (drawn in float32), a finite forward."""
    model_class, make_config = tiny_sea_model_classes()[family]
    model = model_class._from_config(make_config(), dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    projection = next(m for m in model.modules() if isinstance(m, SeaAttention)).feature_projection.float()
    block = projection[: projection.shape[1]]
    directions = block / block.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(directions @ directions.t(), torch.eye(len(block)), atol=2e-2, rtol=0)
    with torch.no_grad():
        logits = model(random_ids(2, 24)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_the_model_loss_trains_the_gates_but_not_the_bin_ranking():
    """What the README's limitations say: the selection is discrete, so the loss alone gives the modules that only
    rank bins (row decoder, CNN) no gradient (distillation's attention losses train them), while the output gates
    and the encoder they read get one."""
    _, sea = converted_opt(sea_key_budget=6, sea_compressed_width=8, sea_bin_ranking="estimate", sea_candidate_factor=1)
    randomize_sea_gates(sea)
    sea.train()
    ids = random_ids(2, 40)
    sea(ids, labels=ids).loss.backward()
    ranking_only = {n: p for n, p in sea.named_parameters() if ".sea.row_decoder." in n or ".sea.cnn." in n}
    read_by_gates = {n: p for n, p in sea.named_parameters() if ".sea.gates." in n or ".sea.encoder." in n}
    assert ranking_only and read_by_gates
    assert all(p.grad is None or not p.grad.any() for p in ranking_only.values())
    assert all(p.grad is not None and p.grad.any() for p in read_by_gates.values())
