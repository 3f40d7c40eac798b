"""The card's plots: cost vs sequence length (from a committed benchmark JSON), one head's attention (dense
teacher vs SEA's estimated mask vs SEA's sparse attention) and, for quality reports, perplexity vs context."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sea.sea_attention import bin_edges, exact_attention, visible_key_counts  # noqa: E402
from training.sea_trainer import record_sea_layers, record_teacher_queries_keys  # noqa: E402

BENCHMARK_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def plot_scaling(benchmark_json: str | Path, path: str | Path, title: str):
    """Median time and peak memory vs sequence length, one line per method, from rows of
    {method, length, seconds, peak_mb}."""
    rows = [row for row in json.loads(Path(benchmark_json).read_text()) if "seconds" in row]  # not the skipped
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((r["length"], r["seconds"], r["peak_mb"]) for r in rows if r["method"] == method)
        lengths = [p[0] for p in points]
        time_axis.plot(lengths, [p[1] * 1000 for p in points], marker="o", label=method)
        memory_axis.plot(lengths, [p[2] for p in points], marker="o", label=method)
    for axis, label in ((time_axis, "time (ms)"), (memory_axis, "peak memory (MB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length")
        axis.set_ylabel(label)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_perplexity(perplexity: dict, contexts: list[int], path: str | Path, title: str):
    """Held-out perplexity vs context length, one line per model, from a quality report's
    {model: {str(context): {"perplexity": ...}}}."""
    figure, axis = plt.subplots(figsize=(8, 5))
    for name, by_context in perplexity.items():
        axis.plot(contexts, [by_context[str(c)]["perplexity"] for c in contexts], marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("perplexity")
    axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@torch.no_grad()
def attention_maps(student, teacher, inputs: dict, layer: int, head: int) -> dict[str, torch.Tensor]:
    """(T, T) maps of one head for the first sequence of `inputs`: the teacher's attention probabilities, SEA's
    estimated attention spread evenly over each bin's keys, and SEA's sparse attention on the keys it selected."""
    student.eval()
    teacher.eval()
    with record_sea_layers(student) as student_layers:
        student(**inputs)
    with record_teacher_queries_keys(teacher) as teacher_layers:
        teacher(**inputs)
    module, output = student_layers[layer]
    valid = output.key_valid[:1].cpu()
    q, k = (teacher_layers[layer][name][:1, head : head + 1].double().cpu() for name in ("q", "k"))
    t = q.shape[2]
    counts = visible_key_counts(valid, module.causal, valid[:, -t:])
    teacher_map, visible = exact_attention(q, k, valid, counts, module.causal, q.shape[-1] ** -0.5, slice(0, t))
    teacher_map, visible = teacher_map[0, 0], visible[0]
    counts = counts[0]
    edges = bin_edges(counts[None], output.estimate_log_probs.shape[-1])[0]
    estimate = output.estimate_log_probs[0, head].double().exp().cpu()
    estimate_map = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        sizes = edges[i].diff()
        keys = visible[i].nonzero().squeeze(-1)  # in order: bin b holds the b-th slice of them
        bins = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        estimate_map[i, keys] = estimate[i, bins] / sizes[bins].double()

    sparse_map = torch.zeros(t, t, dtype=torch.float64)
    chosen = output.selection.key_valid[0, head].cpu()
    rows = torch.arange(t)[:, None].expand_as(chosen)
    sparse_map[rows[chosen], output.selection.key_index[0, head].cpu()[chosen]] = (
        output.sparse_probs[0, head].double().cpu()[chosen]
    )
    return {"dense teacher": teacher_map, "SEA estimated mask": estimate_map, "SEA sparse attention": sparse_map}


def plot_attention(maps: dict[str, torch.Tensor], path: str | Path, title: str):
    figure, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4))
    for axis, (name, values) in zip(axes, maps.items()):
        axis.imshow(values.numpy(), cmap="viridis", interpolation="nearest")
        axis.set_title(name)
        axis.set_xlabel("key")
        axis.set_ylabel("query")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_layer_cost_and_attention(plots: Path, student, teacher, example: dict, example_name: str):
    """The plots every SEA card has, into the folder `plots`: one causal layer's cost vs length (from the committed
    CPU layer benchmark, when present) and one head of the middle layer on `example`, teacher vs SEA."""
    benchmark = BENCHMARK_RESULTS / "layer_memory_cpu.json"
    if benchmark.exists():
        plot_scaling(benchmark, plots / "scaling.png", "One causal attention layer (12 heads x 64), fp32, CPU: SEA vs dense")
    layer = student.config.num_hidden_layers // 2
    maps = attention_maps(student, teacher, example, layer=layer, head=0)
    plot_attention(maps, plots / "attention.png", f"layer {layer}, head 0, {example_name}")
