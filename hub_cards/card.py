"""The model card (README.md) of a SEA model folder, rendered from what the folder holds: `config.json`,
`eval_results.json` (written by conversion/distill.py) and the PNG plots under `plots/`.

Metadata goes through `huggingface_hub.ModelCardData` (so `model-index` is built from `EvalResult`s), the body
through `template.md`.
"""

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sea.configuration_sea import with_bin_ranking

TEMPLATE = Path(__file__).with_name("template.md")
PLOT_CAPTIONS = {
    "plots/scaling.png": "Time and peak memory of one attention layer vs sequence length: SEA next to dense attention.",
    "plots/attention.png": "One head on one held-out input: the dense teacher's attention, SEA's estimated mask, "
    "and SEA's sparse attention over the keys it selected.",
    "plots/perplexity.png": "Held-out perplexity vs context: the dense teacher, SEA and the same-budget baselines.",
}
CITATION = """@inproceedings{lee2024sea,
    title={SEA: Sparse Linear Attention with Estimated Attention Mask},
    author={Heejun Lee and Jina Kim and Jeffery Willette and Sung Ju Hwang},
    booktitle={International Conference on Learning Representations},
    year={2024},
    url={https://openreview.net/forum?id=JbcwfmYrob}
}"""
TASKS = {
    "causal-lm": {"pipeline_tag": "text-generation", "description": "text generation",
                  "auto_class": "AutoModelForCausalLM", "metrics": ("perplexity",)},
    "sequence-classification": {"pipeline_tag": "text-classification", "description": "text classification",
                                "auto_class": "AutoModelForSequenceClassification", "metrics": ("accuracy", "f1")},
}
SEA_MODEL_ROW = "sea (distilled)"
TABLE_COLUMNS = ("perplexity", "accuracy", "f1", "teacher_agreement", "teacher_kl", "teacher_mass_recall",
                 "fraction_of_keys_attended")


def usage_code(task: str, repo: str) -> str:
    auto_class = TASKS[task]["auto_class"]
    lines = [
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'repo = "{repo}"',
        "tokenizer = AutoTokenizer.from_pretrained(repo)",
        f"model = {auto_class}.from_pretrained(repo, trust_remote_code=True)",
    ]
    if task == "causal-lm":
        lines += ['inputs = tokenizer("The history of the city begins", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=30)[0]))"]
    else:
        lines += ['inputs = tokenizer(["a gripping, beautifully acted film"], return_tensors="pt")',
                  "print(model(**inputs).logits.softmax(-1))"]
    return "\n".join(lines)


def evaluation_table(evaluation: dict) -> str:
    columns = [c for c in TABLE_COLUMNS if any(c in metrics for metrics in evaluation.values())]
    rows = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in evaluation.items():
        rows.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns) + " |")
    return "\n".join(rows)


def cost_text(training: dict) -> str:
    return (f"{training['steps']} optimizer steps over {training['tokens_seen']:,} tokens, "
            f"{training['wall_time_s']:.0f} s wall time on {training['processes']} x {training['device']} "
            f"({training['device_hours']} device-hours: {training['scope']}).")


def eval_results(summary: dict) -> list[EvalResult]:
    """The distilled SEA model's own metrics, as `model-index` entries."""
    task, dataset = TASKS[summary["task"]], summary["dataset"]
    metrics = summary["evaluation"][SEA_MODEL_ROW]
    return [
        EvalResult(task_type=task["pipeline_tag"], dataset_type=dataset["id"], dataset_name=dataset["name"],
                   dataset_config=dataset.get("config"), dataset_split=dataset["split"], metric_type=metric,
                   metric_value=round(float(metrics[metric]), 6))
        for metric in task["metrics"] if metric in metrics
    ]


def render_card(folder: str | os.PathLike, load_from: str) -> ModelCard:
    """The card of the SEA model in `folder`, named after and loading from `load_from`: its Hub repo id, or the
    local path it will have (a model is often written to a temporary folder first)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    summary = json.loads((folder / "eval_results.json").read_text())
    task = summary["task"]
    model_name = Path(load_from).name
    data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        base_model=summary.get("base_model_id"),
        license=summary.get("license"),
        datasets=[summary["dataset"]["id"]] if summary["dataset"].get("on_hub") else None,
        tags=["sea", "sparse-attention", "custom_code", config["model_type"]],
        pipeline_tag=TASKS[task]["pipeline_tag"],
        eval_results=eval_results(summary),
    )
    plots = [{"path": path, "caption": caption} for path, caption in PLOT_CAPTIONS.items() if (folder / path).exists()]
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        base_model=summary.get("base_model_id"),
        base_architecture=config["model_type"].upper(),
        task_description=TASKS[task]["description"],
        usage_code=usage_code(task, load_from),
        sea_config={k: v for k, v in with_bin_ranking(config).items() if k.startswith("sea_")},
        eval_description=summary["dataset"]["description"],
        eval_table=evaluation_table(summary["evaluation"]),
        cost_text=cost_text(summary["training"]),
        training=summary["training"],
        plots=plots,
        citation=CITATION,
    )


def write_card(folder: str | os.PathLike, load_from: str) -> Path:
    """Render the card into `folder`/README.md (written to a temporary file, then renamed)."""
    path = Path(folder) / "README.md"
    staging = path.with_name(".README.md.tmp")
    render_card(folder, load_from).save(staging)
    staging.replace(path)
    return path
