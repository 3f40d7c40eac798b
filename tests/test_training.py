"""The distillation losses, the evaluation metrics and the Trainer subclass against independent references."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, OPTForCausalLM, TrainingArguments, default_data_collator

from conftest import dense_test_model, tiny_bert_config, tiny_opt_config
from conversion.convert import convert_to_sea
from sea.configuration_sea import SEA_FAMILIES
from sea.sea_attention import bin_edges, visible_key_counts
from sea.sea_layer import SeaAttention
from training.evaluation import classification_metric, sliding_window_perplexity
from training.sea_trainer import (
    SeaDistillationArguments,
    SeaDistillationTrainer,
    attention_losses,
    record_teacher_queries_keys,
)


def padded_mask(lengths, t, left=False):
    positions = torch.arange(t)
    if left:
        return torch.stack([positions >= t - n for n in lengths])
    return torch.stack([positions < n for n in lengths])


def reference_losses(tq, tk, out, valid, causal, rows_counted=None):
    """The same quantities by explicit loops in float64: teacher softmax row by row, each key put in its bin by
    comparing its rank with the bin edges."""
    n, h, t, d = tq.shape
    width = out.estimate_log_probs.shape[-1]
    edges = bin_edges(visible_key_counts(valid, causal, valid), width)
    sums = dict.fromkeys(("estimate_kl", "estimate_mse", "sparse_kl", "sparse_mse", "teacher_mass", "key_fraction"), 0.0)
    rows = 0
    for b in range(n):
        for i in range(t):
            keys = [j for j in range(t) if valid[b, j] and (not causal or j <= i)]
            if not valid[b, i] or not keys or (rows_counted is not None and not rows_counted[b, i]):
                continue
            for head in range(h):
                rows += 1
                scores = torch.tensor([float(tq[b, head, i].double() @ tk[b, head, j].double()) / math.sqrt(d) for j in keys])
                p = torch.softmax(scores, 0)
                binned = torch.zeros(width, dtype=torch.float64)
                for rank, prob in enumerate(p):
                    bin_of = next(m for m in range(width) if edges[b, i, m] <= rank < edges[b, i, m + 1])
                    binned[bin_of] += prob
                log_est = out.estimate_log_probs[b, head, i].detach().double()
                sums["estimate_kl"] += sum(float(x * (math.log(x) - log_est[m])) for m, x in enumerate(binned) if x > 0)
                sums["estimate_mse"] += float(((log_est.exp() - binned) ** 2).mean())
                chosen = [int(j) for j, ok in zip(out.selection.key_index[b, head, i], out.selection.key_valid[b, head, i]) if ok]
                teacher_on_chosen = torch.tensor([float(p[keys.index(j)]) for j in chosen])
                sums["teacher_mass"] += float(teacher_on_chosen.sum())
                sums["key_fraction"] += len(chosen) / len(keys)
                target = teacher_on_chosen / teacher_on_chosen.sum()
                sparse = out.sparse_probs[b, head, i].detach().double()[out.selection.key_valid[b, head, i]]
                sparse = sparse / sparse.sum()
                sums["sparse_kl"] += float((target * (target.log() - sparse.log())).sum())
                sums["sparse_mse"] += float(((sparse - target) ** 2).mean())
    return {name: value / rows for name, value in sums.items()}


@pytest.mark.parametrize("only_some_rows", [False, True], ids=["all-rows", "counted-rows"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_losses_match_a_loop_reference(causal, only_some_rows):
    n, h, t, d = 2, 3, 13, 8
    config = tiny_bert_config(sea_key_budget=4, sea_compressed_width=4)
    op = SeaAttention(config, h, d, causal).double()
    op.init_sea_weights()
    with torch.no_grad():
        for p in op.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    valid = padded_mask([t, 9], t, left=causal)
    q, k, v = (torch.randn(n, h, t, d, dtype=torch.float64) for _ in range(3))
    out = op(q, k, v, valid, d**-0.5)
    teacher_q, teacher_k = torch.randn(n, h, t, d, dtype=torch.float64), torch.randn(n, h, t, d, dtype=torch.float64)
    rows_counted = torch.rand(n, t) > 0.5 if only_some_rows else None
    got = attention_losses(teacher_q, teacher_k, out, causal, chunk=5, rows_counted=rows_counted)
    want = reference_losses(teacher_q, teacher_k, out, valid, causal, rows_counted)
    for name, value in want.items():
        assert float(torch.as_tensor(got[name]).detach()) == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert 0 < want["key_fraction"] < 1  # the budget really leaves keys out


def test_estimate_kl_in_bins_has_the_gradient_of_the_kl_over_every_key():
    """The binned KL and the reference's KL against the estimate spread evenly over each bin's keys differ by a
    constant, so they train the estimate identically."""
    n, h, t, d, width = 1, 2, 11, 8, 4
    config = tiny_opt_config(sea_key_budget=3, sea_compressed_width=width)
    op = SeaAttention(config, h, d, causal=True).double()
    op.init_sea_weights()
    valid = torch.ones(n, t, dtype=torch.bool)
    q, k, v = (torch.randn(n, h, t, d, dtype=torch.float64) for _ in range(3))
    teacher_q, teacher_k = torch.randn(n, h, t, d, dtype=torch.float64), torch.randn(n, h, t, d, dtype=torch.float64)

    def gradient(loss_of):
        op.zero_grad()
        loss_of(op(q, k, v, valid, d**-0.5)).backward()
        return torch.cat([p.grad.flatten() for p in op.parameters() if p.grad is not None])

    binned = gradient(lambda out: attention_losses(teacher_q, teacher_k, out, True, chunk=4)["estimate_kl"])

    def full_kl(out):
        edges = bin_edges(visible_key_counts(valid, True, valid), width)[0]
        total = 0.0
        for i in range(t):
            scores = (teacher_q[0, :, i, None] @ teacher_k[0, :, : i + 1].transpose(-1, -2)).squeeze(-2) / math.sqrt(d)
            p = torch.softmax(scores, -1)  # (H, i + 1)
            sizes = edges[i].diff()
            bin_of_key = torch.repeat_interleave(torch.arange(width), sizes)
            log_spread = out.estimate_log_probs[0, :, i, bin_of_key] - sizes[bin_of_key].double().log()
            total = total + (p * (p.log() - log_spread)).sum()
        return total / (t * h)

    torch.testing.assert_close(binned, gradient(full_kl), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("model_type", list(SEA_FAMILIES))
def test_recorded_teacher_queries_keys_rebuild_its_attention(model_type):
    """The queries and keys recorded through the family's `query_key_modules` (rotated, for a family with RoPE)
    rebuild the dense teacher's own attention probabilities, for every family in the registry."""
    torch.manual_seed(0)
    teacher = dense_test_model(model_type)
    causal = SEA_FAMILIES[model_type].causal
    t = 10
    mask = padded_mask([t, 6], t, left=causal)  # causal batches are padded on the left, as generation pads them
    with torch.no_grad(), record_teacher_queries_keys(teacher) as layers:
        attentions = teacher(torch.randint(3, 120, (2, t)), attention_mask=mask, output_attentions=True).attentions
    assert len(layers) == len(attentions) == teacher.config.num_hidden_layers
    visible = mask[:, None, None, :] & (torch.ones(t, t, dtype=torch.bool).tril() if causal else True)
    for recorded, attention in zip(layers, attentions):
        q, k = recorded["q"], recorded["k"]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query: each key head serves a group
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        rebuilt = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        real_rows = mask[:, None, :, None].expand_as(rebuilt)  # a padded query's row is whatever the model fills in
        torch.testing.assert_close(rebuilt[real_rows], attention[real_rows], rtol=1e-5, atol=1e-6)


def test_kernel_attention_only_outputs_the_performer_attention_of_the_values():
    n, h, t, d = 2, 3, 9, 8
    op = SeaAttention(tiny_opt_config(sea_baseline="kernel_attention"), h, d, causal=True).double()
    op.init_sea_weights()
    q, k, v = (torch.randn(n, h, t, d, dtype=torch.float64) for _ in range(3))
    valid = padded_mask([t, 6], t, left=True)
    out = op(q, k, v, valid, d**-0.5)
    # Dense float64 reference: causal ReLU random-feature kernel, normalised over visible keys.
    projection = op.feature_projection.double()
    phi = lambda x: torch.relu((x * d**-0.25) @ projection.t()) + 1e-3
    weights = (phi(q) @ phi(k).transpose(-1, -2)) * torch.tril(torch.ones(t, t, dtype=torch.float64))
    weights = weights * valid[:, None, None, :]
    expected = (weights @ v) / weights.sum(-1, keepdim=True)
    real = valid[:, None, :, None].expand_as(expected)
    torch.testing.assert_close(out.context[real], expected[real], rtol=1e-9, atol=1e-9)
    assert out.selection.key_index.shape[-1] == 0 and out.sparse_probs.numel() == 0


def test_sliding_window_perplexity_scores_every_token_once_with_its_window_context():
    torch.manual_seed(0)
    model = OPTForCausalLM(tiny_opt_config(dense=True)).eval()
    tokens = torch.randint(0, 120, (50,)).tolist()
    window, stride = 16, 6
    # Reference: token p is predicted from the window that first reaches it, one forward per token.
    nll = 0.0
    with torch.no_grad():
        for p in range(1, len(tokens)):
            begin = max(0, math.ceil((p + 1 - window) / stride)) * stride
            logits = model(torch.tensor([tokens[begin:p]])).logits[0, -1].double()
            nll -= float(torch.log_softmax(logits, -1)[tokens[p]])
    got = sliding_window_perplexity(model, tokens, window=window, stride=stride)
    assert got["tokens_scored"] == 49
    assert got["perplexity"] == pytest.approx(math.exp(nll / 49), rel=1e-5)
    whole = sliding_window_perplexity(model, tokens, window=64, stride=32)
    with torch.no_grad():
        loss = model(torch.tensor([tokens]), labels=torch.tensor([tokens])).loss
    assert whole["tokens_scored"] == 49 and whole["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-6)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, tokens, window=16, stride=16)


def test_long_context_only_scores_the_tokens_with_a_full_window_before_them():
    """With `long_context_only`, every scored token has at least window - stride tokens before it in its window,
    and the result is the same per-token reference restricted to those tokens."""
    model = OPTForCausalLM(tiny_opt_config(dense=True)).eval()
    tokens = torch.randint(0, 120, (47,)).tolist()
    window, stride = 16, 4
    nll, scored = 0.0, 0
    with torch.no_grad():
        for p in range(window - stride, len(tokens)):
            begin = max(0, math.ceil((p + 1 - window) / stride)) * stride
            assert p - begin >= window - stride
            logits = model(torch.tensor([tokens[begin:p]])).logits[0, -1].double()
            nll -= float(torch.log_softmax(logits, -1)[tokens[p]])
            scored += 1
    got = sliding_window_perplexity(model, tokens, window=window, stride=stride, long_context_only=True)
    assert got["tokens_scored"] == scored == len(tokens) - (window - stride)
    assert got["perplexity"] == pytest.approx(math.exp(nll / scored), rel=1e-5)


@pytest.mark.parametrize("classes", [2, 3])
def test_classification_metric_matches_counting(classes):
    """Accuracy, and F1 (binary F1 of class 1 for two classes, else the mean of the per-class F1), of random
    predictions against counts of true and false positives."""
    predictions, references = (torch.randint(0, classes, (200,)).tolist() for _ in range(2))
    metric = classification_metric()
    for start in range(0, 200, 64):  # in batches, as the evaluation adds them
        metric.add_batch(predictions=predictions[start:start + 64], references=references[start:start + 64])
    got = metric.compute()

    def f1(c):
        tp = sum(p == r == c for p, r in zip(predictions, references))
        return 2 * tp / (predictions.count(c) + references.count(c))

    scored = [1] if classes == 2 else range(classes)
    assert got["accuracy"] == pytest.approx(sum(p == r for p, r in zip(predictions, references)) / 200)
    assert got["f1"] == pytest.approx(sum(f1(c) for c in scored) / len(scored))


def tiny_classification_data(count=16, length=12):
    torch.manual_seed(1)
    ids = torch.randint(1, 120, (count, length))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * count,
                              "labels": (ids[:, 0] % 3).tolist()})


def train_student(tmp_path, name, batch, accumulation, steps, optim="adamw_torch"):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(dense=True)).eval()
    torch.manual_seed(0)
    student = convert_to_sea(teacher, sea_key_budget=4, sea_compressed_width=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=batch, max_steps=steps,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3, report_to="none",
                             save_strategy="no", logging_steps=1, seed=0, use_cpu=True, optim=optim)
    trainer = SeaDistillationTrainer(model=student, args=args, train_dataset=tiny_classification_data(),
                                     data_collator=default_data_collator, teacher=teacher,
                                     distillation=SeaDistillationArguments(hidden_mse_weight=0.5))
    trainer.train()
    return trainer, teacher, before


def test_trainer_keeps_the_teacher_frozen_and_apart(tmp_path):
    trainer, teacher, before = train_student(tmp_path, "frozen", batch=4, accumulation=1, steps=3)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_storage & {p.data_ptr() for p in trainer.model.parameters()}
    logged = trainer.state.log_history[0]
    for part in ("task", "logits_kd", "hidden_mse", "estimate_kl", "estimate_mse", "sparse_kl", "sparse_mse"):
        assert math.isfinite(logged[f"loss_{part}"]), part
    assert logged["loss_estimate_kl"] > 0


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """The loss is a batch mean, so two accumulated half batches must give the full batch's update. (One step:
    later steps may legitimately select different keys from float32 rounding of differently batched matmuls. SGD,
    because Adam's first step divides tiny gradients by themselves and so magnifies rounding.)"""
    big, _, _ = train_student(tmp_path, "big", batch=8, accumulation=1, steps=1, optim="sgd")
    accumulated, _, _ = train_student(tmp_path, "accumulated", batch=4, accumulation=2, steps=1, optim="sgd")
    assert big.state.log_history[0]["grad_norm"] == pytest.approx(accumulated.state.log_history[0]["grad_norm"], rel=1e-5)
    for (name, a), b in zip(big.model.state_dict().items(), accumulated.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
