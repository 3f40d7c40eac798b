"""Where distilled SEA loses perplexity: the distilled SmolLM2 SEA model of `quality.py` at its longest context
with the key budget changed per group of layers (dense early layers, dense late layers, twice the budget, and the
same total budget moved to the early layers whose masks miss most of the teacher's mass).

    python benchmarks/quality_layers.py --model DIR_WITH_THE_GGUF --work-dir outputs/quality-smollm2
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality import GGUF_FILE, sea_model, with_trained_weights  # noqa: E402
from conversion.convert import load_dense  # noqa: E402
from sea.sea_layer import SeaAttention  # noqa: E402
from training.evaluation import sliding_window_perplexity  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--work-dir", default="outputs/quality-smollm2")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--key-budget", type=int, default=480)
    parser.add_argument("--compressed-width", type=int, default=128)
    parser.add_argument("--early-layers", type=int, default=11, help="layers counted as early (by their teacher mass)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_dense(args.model, gguf_file=GGUF_FILE).to(device).eval()
    model = with_trained_weights(sea_model(teacher, args), work / "sea-distilled.safetensors").eval()
    layers = [m for m in model.modules() if isinstance(m, SeaAttention)]
    early, late, budget, context = args.early_layers, len(layers) - args.early_layers, args.key_budget, args.context
    moved = (len(layers) * budget - early * 2 * budget) // late  # same total keys, twice the budget early
    variants = {
        "as distilled": [budget] * len(layers),
        f"layers 0-{early - 1} dense": [context] * early + [budget] * late,
        f"layers {early}-{len(layers) - 1} dense": [budget] * early + [context] * late,
        "twice the budget everywhere": [2 * budget] * len(layers),
        f"2x budget in layers 0-{early - 1}, {moved} keys later (same mean)": [2 * budget] * early + [moved] * late,
    }
    tokens = torch.load(work / "tokens.pt")["held_out"].tolist()
    stride = context // 16
    scored = tokens[: args.eval_tokens + context - stride]
    results = {}
    for name, budgets in variants.items():
        for layer, keys in zip(layers, budgets):  # a layer reads its budget from its config: one copy per layer
            layer.config = copy.copy(model.config)
            layer.config.sea_key_budget = keys
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            result = sliding_window_perplexity(model, scored, context, stride, long_context_only=True)
        results[name] = {"mean_budget": sum(budgets) / len(budgets), **result}
        print(f"{name}: ppl {result['perplexity']:.2f}, mean keys per query {sum(budgets) / len(budgets):.0f}", flush=True)
    (work / "layer-budgets.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
