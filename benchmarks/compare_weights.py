"""Compare the SEA mask-estimator weights of two distilled model folders (e.g. a 1-GPU and a 2-GPU run of the same
distillation): the largest absolute difference, the relative L2 distance ||B - A|| / ||A||, and, given the folder
of the run's starting point (`--max-steps 0`), that distance against how far training moved A. Prints the training
throughput each folder's eval_results.json records.

    python benchmarks/compare_weights.py outputs/one-gpu outputs/ddp --start outputs/start --tolerance 0.05
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.sea_trainer import is_estimator_parameter


def estimator_weights(folder: str) -> dict[str, torch.Tensor]:
    weights = load_file(Path(folder) / "model.safetensors")
    return {name: tensor.double() for name, tensor in weights.items() if is_estimator_parameter(name)}


def norm(weights: dict) -> float:
    """The L2 norm of every tensor together."""
    return sum(float(tensor.norm() ** 2) for tensor in weights.values()) ** 0.5


def difference(a: dict, b: dict) -> dict:
    return {name: b[name] - a[name] for name in a}


def throughput(folder: str) -> str:
    training = json.loads((Path(folder) / "eval_results.json").read_text())["training"]
    per_second = training["tokens_seen"] / training["distillation_time_s"]
    return (f"{folder}: {training['steps']} steps, {training['tokens_seen']:,} tokens in "
            f"{training['distillation_time_s']} s on {training['processes']} x {training['device']}: "
            f"{per_second:,.0f} tokens/s, {per_second / training['processes']:,.0f} per process")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="reference run's model folder (e.g. 1 GPU)")
    parser.add_argument("b", help="run compared with it (e.g. 2 GPUs)")
    parser.add_argument("--start", help="model folder of the untrained starting point (a --max-steps 0 run)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest accepted ||B - A|| / ||A - start|| (needs --start; exit status 1 beyond)")
    args = parser.parse_args(argv)
    a, b = estimator_weights(args.a), estimator_weights(args.b)
    if a.keys() != b.keys():
        raise SystemExit(f"the folders hold different estimator tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    for folder in (args.a, args.b):
        print(throughput(folder))
    apart = difference(a, b)
    largest, name = max((float(tensor.abs().max()), name) for name, tensor in apart.items())
    print(f"{len(a)} estimator tensors: max |B - A| = {largest:.3e} ({name}), ||B - A|| / ||A|| = "
          f"{norm(apart) / norm(a):.3e}")
    if args.start is None:
        return
    moved = norm(difference(estimator_weights(args.start), a))
    ratio = norm(apart) / moved
    verdict = "within" if ratio <= args.tolerance else "BEYOND"
    print(f"||A - start|| / ||A|| = {moved / norm(a):.3e}; ||B - A|| / ||A - start|| = {ratio:.3e}, {verdict} the "
          f"tolerance {args.tolerance}")
    if ratio > args.tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
