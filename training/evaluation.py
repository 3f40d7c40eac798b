"""Held-out evaluation of teachers and SEA students: task metrics through `evaluate`, perplexity with a sliding
window, and SEA's own numbers (how much of the teacher's attention mass the selected keys hold, and what share
of the visible keys a query reads)."""

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from .sea_trainer import attention_losses, record_sea_layers, record_teacher_queries_keys

LOCAL_CLASSIFICATION_METRIC = Path(__file__).parent / "metrics" / "sea_classification"


def classification_metric():
    """Accuracy and F1 (the project's `evaluate` module: the same numbers online and offline, any class count)."""
    import evaluate  # only classification needs it (and its `datasets` dependency); perplexity runs without

    return evaluate.load(str(LOCAL_CLASSIFICATION_METRIC))


class TeacherFidelity:
    """How closely a student's outputs follow the dense teacher's on the same inputs: the share of items (examples,
    or tokens for a language model) where both pick the same class/token, and the mean KL(teacher || student)."""

    def __init__(self):
        self.agree, self.kl, self.items = 0.0, 0.0, 0

    def add(self, student_logits, teacher_logits):
        log_s, log_t = torch.log_softmax(student_logits.double(), -1), torch.log_softmax(teacher_logits.double(), -1)
        self.agree += float((log_s.argmax(-1) == log_t.argmax(-1)).sum())
        self.kl += float((log_t.exp() * (log_t - log_s)).sum(-1).sum())
        self.items += log_s.shape[:-1].numel()

    def result(self) -> dict:
        if not self.items:
            return {}
        return {"teacher_agreement": self.agree / self.items, "teacher_kl": self.kl / self.items}


class SeaAttentionStats:
    """Running means of SEA's per-layer selection statistics against a dense teacher."""

    def __init__(self):
        self.layer_mass, self.fraction, self.batches = None, 0.0, 0

    def add(self, student_layers, teacher_layers, chunk: int, rows_counted=None):
        masses, fractions = [], []
        for (module, output), t in zip(student_layers, teacher_layers):
            stats = attention_losses(t["q"], t["k"], output, module.causal, chunk, rows_counted)
            masses.append(float(stats["teacher_mass"]))
            fractions.append(float(stats["key_fraction"]))
        self.layer_mass = masses if self.layer_mass is None else [a + b for a, b in zip(self.layer_mass, masses)]
        self.fraction += sum(fractions) / len(fractions)
        self.batches += 1

    def result(self) -> dict:
        if not self.batches:
            return {}
        per_layer = [mass / self.batches for mass in self.layer_mass]
        return {"teacher_mass_recall": sum(per_layer) / len(per_layer), "fraction_of_keys_attended": self.fraction / self.batches,
                "teacher_mass_recall_per_layer": per_layer}


def selects_keys(student_layers) -> bool:
    """Whether the recorded layers are SEA layers that select keys (not dense, not the kernel-only baseline)."""
    return bool(student_layers) and student_layers[0][0].baseline != "kernel_attention"


@torch.no_grad()
def evaluate_classifier(model, dataset, tokenizer, batch_size: int, teacher=None, query_chunk: int = 256) -> dict:
    """Accuracy and F1 on `dataset`; with a `teacher`, also fidelity to it and SEA's attention statistics."""
    model.eval()
    device = next(model.parameters()).device
    metric = classification_metric()
    stats, fidelity = SeaAttentionStats(), TeacherFidelity()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with record_sea_layers(model) as student_layers:
            logits = model(**batch).logits
        metric.add_batch(predictions=logits.argmax(-1).tolist(), references=labels.tolist())
        if teacher is not None:
            with record_teacher_queries_keys(teacher) as teacher_layers:
                fidelity.add(logits, teacher(**batch).logits)
            if selects_keys(student_layers):
                stats.add(student_layers, teacher_layers, query_chunk)
    return {**metric.compute(), **fidelity.result(), **stats.result()}


@torch.no_grad()
def sliding_window_perplexity(
    model, tokens: list[int], window: int, stride: int, teacher=None, query_chunk: int = 256, long_context_only=False
):
    """exp(mean NLL) over every token after the first, each scored once with up to `window - stride` tokens of
    context before the stride it belongs to; tokens are counted exactly. `long_context_only` also skips the first
    `window - stride` tokens of the first window, so every scored token has at least that much context."""
    if not 0 < stride < window:
        raise ValueError(f"The perplexity stride ({stride}) must be in [1, window={window}) so every token has context.")
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(tokens, device=device)
    total_nll, counted, previous_end = 0.0, 0, 0
    stats, fidelity = SeaAttentionStats(), TeacherFidelity()
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        chunk = ids[begin:end][None]
        labels = chunk.clone()
        skipped = window - stride if long_context_only else 1
        labels[:, : max(previous_end - begin, skipped)] = -100  # context already scored, and the first token(s)
        with record_sea_layers(model) as student_layers:
            logits = model(chunk, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")
        scored = int((labels[0, 1:] != -100).sum())
        total_nll += float(nll)
        counted += scored
        if teacher is not None:
            with record_teacher_queries_keys(teacher) as teacher_layers:
                teacher_logits = teacher(chunk, use_cache=False).logits
            scored_rows = labels[0, 1:] != -100
            fidelity.add(logits[0, :-1][scored_rows], teacher_logits[0, :-1][scored_rows])
            if selects_keys(student_layers):
                # Only the query rows whose next-token prediction is scored, as for the perplexity.
                rows = torch.cat([scored_rows, scored_rows.new_zeros(1)])[None]
                stats.add(student_layers, teacher_layers, query_chunk, rows)
        previous_end = end
        if end == len(tokens):
            break
    return {
        "perplexity": math.exp(total_nll / max(counted, 1)), "tokens_scored": counted, **fidelity.result(),
        **stats.result(),
    }
