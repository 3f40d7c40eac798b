"""Distillation of a dense teacher into its SEA student with the HF `Trainer`.

The loss combines, with configurable weights:
* the task loss (LM cross-entropy or classification cross-entropy) of the student;
* logits knowledge distillation: KL(teacher || student) of temperature-softened outputs, times T^2;
* per-layer attention distillation, as in the reference: KL + MSE between the teacher's attention
  probabilities and (a) the student's estimated attention, (b) the student's sparse attention over the keys it
  selected. (a) is computed in the student's compressed space: the teacher's probabilities summed into the same
  M bins. That KL has exactly the gradient of the reference's KL against the estimate expanded to every key (the
  two differ by a term the student cannot change) at O(T M) instead of O(T^2). Teacher attention is rebuilt from
  its queries and keys in chunks of query rows, so memory stays bounded at long T;
* optionally, the MSE between teacher and student hidden states.

The teacher runs in eval mode under no_grad and shares no parameter with the student.
"""

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sea.configuration_sea import SEA_FAMILIES
from sea.sea_attention import (
    at_least_float32,
    bin_edge_prefix_lengths,
    bin_edges,
    binned_rows,
    exact_attention,
    visible_key_counts,
)
from sea.sea_layer import SeaAttention


# Weights of the losses on the model's outputs, and of those on its attention (estimate and sparse).
OUTPUT_LOSSES = ("task_loss_weight", "logits_kd_weight", "hidden_mse_weight")
ATTENTION_LOSSES = ("estimate_kl_weight", "estimate_mse_weight", "sparse_kl_weight", "sparse_mse_weight")
LOSS_WEIGHTS = OUTPUT_LOSSES + ATTENTION_LOSSES


@dataclass
class SeaDistillationArguments:
    """Weights of the distillation losses and SEA-specific optimisation settings."""

    task_loss_weight: float = field(default=1.0, metadata={"help": "weight of the student's own task loss"})
    logits_kd_weight: float = field(default=1.0, metadata={"help": "weight of KL(teacher || student) on outputs"})
    kd_temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the logits KD"})
    estimate_kl_weight: float = field(default=0.1, metadata={"help": "KL(teacher attention || SEA estimate)"})
    estimate_mse_weight: float = field(default=1.0, metadata={"help": "MSE(teacher attention, SEA estimate), in bins"})
    sparse_kl_weight: float = field(default=0.1, metadata={"help": "KL(teacher || SEA sparse attention), on the selected keys"})
    sparse_mse_weight: float = field(default=1.0, metadata={"help": "MSE(teacher, SEA sparse attention), on the selected keys"})
    hidden_mse_weight: float = field(default=0.0, metadata={"help": "MSE between teacher and student hidden states"})
    attention_query_chunk: int = field(default=256, metadata={"help": "query rows per chunk of the attention losses"})
    sea_learning_rate_scale: float = field(
        default=10.0, metadata={"help": "learning rate of the new SEA parameters = learning_rate x this"}
    )

    def __post_init__(self):
        for name in LOSS_WEIGHTS:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not any(getattr(self, name) > 0 for name in LOSS_WEIGHTS):
            raise ValueError(f"At least one loss weight must be > 0: {', '.join('--' + n.replace('_', '-') for n in LOSS_WEIGHTS)}")
        if self.kd_temperature <= 0 or self.attention_query_chunk < 1 or self.sea_learning_rate_scale <= 0:
            raise ValueError("--kd-temperature and --sea-learning-rate-scale must be > 0, --attention-query-chunk >= 1")

    @property
    def needs_attention(self) -> bool:
        return any(w > 0 for w in (self.estimate_kl_weight, self.estimate_mse_weight, self.sparse_kl_weight,
                                   self.sparse_mse_weight))


def is_sea_parameter(name: str) -> bool:
    return ".sea." in name or name.startswith("sea.")


def is_gate(name: str) -> bool:
    return ".sea.gates." in name


def is_estimator_parameter(name: str) -> bool:
    """A parameter of SEA's mask estimator: every new SEA parameter except the output gates."""
    return is_sea_parameter(name) and not is_gate(name)


@contextlib.contextmanager
def record_sea_layers(model):
    """Collects, in layer order, each SEA layer and its output (with its sparse probabilities, and the key mask
    the forward used: `SeaAttentionOutput.key_valid`) during a forward."""
    records = []

    def hook(module, args, output):
        records.append((module, output))

    def need_probs(module, args, kwargs):  # the attention losses and plots read the sparse probabilities
        return args, {**kwargs, "need_probs": True}

    layers = [m for m in model.modules() if isinstance(m, SeaAttention)]
    handles = [m.register_forward_hook(hook) for m in layers]
    handles += [m.register_forward_pre_hook(need_probs, with_kwargs=True) for m in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def teacher_queries_keys_modules(teacher):
    """(attention module, module giving its queries, module giving its keys) of every self-attention layer of a
    dense teacher, by the names its family's registry record gives (`SeaFamily.query_key_modules`)."""
    query_name, key_name = SEA_FAMILIES[teacher.config.model_type].query_key_modules
    return [
        (module, getattr(module, query_name), getattr(module, key_name))
        for module in teacher.modules()
        if hasattr(module, query_name) and hasattr(module, key_name)
    ]


@contextlib.contextmanager
def record_teacher_queries_keys(teacher):
    """Collects each teacher layer's queries (N, H, T, D) and keys (N, H_kv, T, D), unscaled, during a forward;
    layers given rotary `position_embeddings` (the Llama-like families) record them rotated, as their attention
    scores use them."""
    config = teacher.config
    # transformers' rule for every family: an explicit head_dim (Qwen3's is not hidden_size / heads), else the split.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    records = []
    handles = []
    for attention, query_module, key_module in teacher_queries_keys_modules(teacher):
        entry = {}
        records.append(entry)

        def keep(name, entry=entry):
            def hook(module, args, output):  # (N, T, heads x D) from a projection, (N, T, heads, D) from a norm
                n, t = output.shape[:2]
                entry[name] = output.reshape(n, t, -1, head_dim).transpose(1, 2)
            return hook

        def rotate(module, args, kwargs, output, entry=entry):
            if kwargs.get("position_embeddings") is not None:
                entry["q"], entry["k"] = apply_rotary_pos_emb(entry["q"], entry["k"], *kwargs["position_embeddings"])

        handles += [query_module.register_forward_hook(keep("q")), key_module.register_forward_hook(keep("k")),
                    attention.register_forward_hook(rotate, with_kwargs=True)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def kl_rows(target: torch.Tensor, log_pred: torch.Tensor) -> torch.Tensor:
    """sum_x target log(target / pred) per row, 0 where target is 0."""
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_pred), torch.zeros_like(target))
    return terms.sum(-1)


def attention_losses(teacher_q, teacher_k, output, causal: bool, chunk: int, rows_counted=None) -> dict:
    """KL and MSE of the student's estimate and sparse attention against the teacher's attention for one layer,
    averaged over heads and the query rows that see a key (and, given `rows_counted` (N, T) bool, are among those);
    also (without gradient) the teacher's attention mass on the selected keys and the share of visible keys
    selected, over the keys `output.key_valid` marks. The teacher's T x T probabilities exist one chunk of rows
    at a time."""
    n, h, t, d = teacher_q.shape
    key_valid = output.key_valid
    width = output.estimate_log_probs.shape[-1]
    counts = visible_key_counts(key_valid, causal, key_valid[:, -t:])
    edges = bin_edges(counts, width)
    edge_prefix = bin_edge_prefix_lengths(key_valid, edges)
    totals = dict.fromkeys(("estimate_kl", "estimate_mse", "sparse_kl", "sparse_mse", "teacher_mass", "key_fraction"), 0.0)
    rows_seen = 0
    for r0 in range(0, t, chunk):
        rows = slice(r0, min(t, r0 + chunk))
        c = rows.stop - r0
        teacher_p, _ = exact_attention(teacher_q, teacher_k, key_valid, counts, causal, d**-0.5, rows)
        binned = binned_rows(teacher_p, edge_prefix[:, :, rows])  # teacher mass per student bin
        estimate = output.estimate_log_probs[:, :, rows]
        # Rows of real queries that see at least one key (a padded query's row means nothing), if counted.
        rows_used = (counts[:, rows] > 0) & key_valid[:, -t:][:, rows]
        if rows_counted is not None:
            rows_used = rows_used & rows_counted[:, rows]
        rows_used = rows_used[:, None, :].expand(n, h, c)
        totals["estimate_kl"] = totals["estimate_kl"] + kl_rows(binned, estimate)[rows_used].sum()
        totals["estimate_mse"] = totals["estimate_mse"] + ((estimate.exp() - binned) ** 2).mean(-1)[rows_used].sum()
        selected = output.selection.key_index[:, :, rows]
        valid = output.selection.key_valid[:, :, rows]
        target = teacher_p.gather(-1, selected) * valid
        mass = target.sum(-1, keepdim=True)
        totals["teacher_mass"] = totals["teacher_mass"] + mass.squeeze(-1)[rows_used].detach().sum()
        fraction = valid.sum(-1) / counts[:, None, rows].clamp_min(1)
        totals["key_fraction"] = totals["key_fraction"] + fraction[rows_used].sum()
        target = target / mass.clamp_min(1e-30)
        sparse = at_least_float32(output.sparse_probs[:, :, rows]) * valid
        sparse = sparse / sparse.sum(-1, keepdim=True).clamp_min(1e-30)
        totals["sparse_kl"] = totals["sparse_kl"] + kl_rows(target, sparse.clamp_min(1e-30).log())[rows_used].sum()
        sq = ((sparse - target) ** 2 * valid).sum(-1) / valid.sum(-1).clamp_min(1)
        totals["sparse_mse"] = totals["sparse_mse"] + sq[rows_used].sum()
        rows_seen += int(rows_used.sum())
    return {name: value / max(rows_seen, 1) for name, value in totals.items()}


class SeaDistillationTrainer(Trainer):
    """`Trainer` whose loss distils `teacher` into the SEA model being trained (see the module docstring)."""

    def __init__(self, *args, teacher=None, distillation: SeaDistillationArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is None:
            raise ValueError("SeaDistillationTrainer needs the dense `teacher` model.")
        self.teacher = teacher.eval().requires_grad_(False)
        # compute_loss returns a mean over the batch, so the Trainer must divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.distillation = distillation or SeaDistillationArguments()
        self._loss_parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = self.distillation
        if next(self.teacher.parameters()).device != self.args.device:
            self.teacher.to(self.args.device)
        want_hidden = weights.hidden_mse_weight > 0
        with record_sea_layers(model) as student_layers:
            outputs = model(**inputs, output_hidden_states=want_hidden)
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), record_teacher_queries_keys(self.teacher) as teacher_layers:
            teacher_out = self.teacher(**teacher_inputs, output_hidden_states=want_hidden)
        parts = {"task": outputs.loss if outputs.loss is not None else outputs.logits.new_zeros(())}
        valid_tokens = inputs.get("attention_mask")
        parts["logits_kd"] = self._logits_kd(outputs.logits, teacher_out.logits, valid_tokens)
        if want_hidden:
            parts["hidden_mse"] = torch.stack(
                [F.mse_loss(s, t) for s, t in zip(outputs.hidden_states, teacher_out.hidden_states)]
            ).mean()
        if weights.needs_attention:
            per_layer = [
                attention_losses(t["q"], t["k"], out, module.causal, weights.attention_query_chunk)
                for (module, out), t in zip(student_layers, teacher_layers)
            ]
            for name in ("estimate_kl", "estimate_mse", "sparse_kl", "sparse_mse"):
                parts[name] = torch.stack([torch.as_tensor(layer[name]) for layer in per_layer]).mean()
        weight_of = {
            "task": weights.task_loss_weight, "logits_kd": weights.logits_kd_weight,
            "hidden_mse": weights.hidden_mse_weight, "estimate_kl": weights.estimate_kl_weight,
            "estimate_mse": weights.estimate_mse_weight, "sparse_kl": weights.sparse_kl_weight,
            "sparse_mse": weights.sparse_mse_weight,
        }
        # Zero-weighted parts stay out of the graph: with only the estimator training, the output losses would
        # otherwise drag a useless backward through the whole network.
        loss = sum(weight_of[name] * value for name, value in parts.items() if weight_of[name] > 0)
        for name, value in parts.items():
            self._loss_parts.setdefault(name, []).append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def _logits_kd(self, student_logits, teacher_logits, attention_mask):
        """KL(teacher || student) of temperature-softened distributions x T^2, per token (LM) or example."""
        tau = self.distillation.kd_temperature
        log_s = torch.log_softmax(student_logits.float() / tau, -1)
        log_t = torch.log_softmax(teacher_logits.float() / tau, -1)
        per_item = (log_t.exp() * (log_t - log_s)).sum(-1)
        if per_item.dim() == 2 and attention_mask is not None:  # token level: only real tokens count
            mask = attention_mask.to(per_item.dtype)
            return (per_item * mask).sum() / mask.sum().clamp_min(1) * tau**2
        return per_item.mean() * tau**2

    def log(self, logs, *args, **kwargs):
        for name, values in self._loss_parts.items():
            if values:
                logs[f"loss_{name}"] = round(sum(values) / len(values), 6)
        self._loss_parts = {}
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        """AdamW (or the configured optimizer) with the new SEA parameters at `sea_learning_rate_scale` x lr."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = (is_sea_parameter(name), name in decay)
            groups.setdefault(key, []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        base_lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        param_groups = [
            {"params": params, "lr": base_lr * (self.distillation.sea_learning_rate_scale if sea else 1.0),
             "weight_decay": self.args.weight_decay if decays else 0.0}
            for (sea, decays), params in groups.items()
        ]
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer
