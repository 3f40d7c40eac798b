"""The contract with published checkpoints and the Hub loader: the saved weight names and shapes of every
family's converted model, the remote-code files a saved folder carries, and the bundle's flat relative imports.

A deliberate change to the contract (a new weight, a renamed one) rewrites the frozen file with
`python tests/test_contract.py`, and says so in its commit: checkpoints already on the Hub keep the old names."""

import ast
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import dense_test_model  # noqa: E402
from conversion.convert import convert_to_sea  # noqa: E402
from sea.configuration_sea import SEA_FAMILIES  # noqa: E402

CONTRACT = Path(__file__).parent / "contract" / "saved_weights.json"
BUNDLE_DIR = Path(__file__).resolve().parents[1] / "sea"
BUNDLE = ["configuration_sea.py", "modeling_sea.py", "sea_attention.py", "sea_cache.py", "sea_dispatch.py",
          "sea_estimate_kernels.py", "sea_layer.py", "sea_sparse_kernels.py"]
# Packages of this repository that the bundle must never import (the Hub loader copies only the bundle).
PROJECT_PACKAGES = {"sea", "conversion", "training", "hub_cards", "benchmarks"}
SEA = dict(sea_key_budget=8, sea_compressed_width=16)


def converted_models() -> dict:
    """model_type (the dense family's, which the SEA config keeps) -> the converted model of every registered
    family, at its test shape."""
    torch.manual_seed(0)
    return {model_type: convert_to_sea(dense_test_model(model_type), **SEA) for model_type in SEA_FAMILIES}


def saved_weights(model, folder: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor `save_pretrained` writes, and the Python files it writes beside them."""
    model.save_pretrained(folder)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        shapes = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}
    return {"weights": dict(sorted(shapes.items())), "code": sorted(p.name for p in folder.glob("*.py"))}


def test_saved_weight_names_and_shapes_and_code_files_match_the_frozen_contract(tmp_path):
    frozen = json.loads(CONTRACT.read_text())
    for family, model in converted_models().items():
        saved = saved_weights(model, tmp_path / family)
        assert saved["code"] == BUNDLE, family
        missing = frozen[family].keys() - saved["weights"].keys()
        added = saved["weights"].keys() - frozen[family].keys()
        assert not missing and not added, f"{family}: weights missing {sorted(missing)}, new {sorted(added)}"
        assert saved["weights"] == frozen[family], family


def test_bundle_imports_only_its_own_files_by_flat_relative_imports():
    """The Hub loader resolves `from .name import ...` to files beside the weights and nothing else."""
    assert sorted(p.name for p in BUNDLE_DIR.glob("*.py") if p.name != "__init__.py") == BUNDLE
    for file in BUNDLE:
        tree = ast.parse((BUNDLE_DIR / file).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module and "." not in node.module, (file, node.module)
                assert f"{node.module}.py" in BUNDLE, (file, node.module)
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert name.split(".")[0] not in PROJECT_PACKAGES, (file, name)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        contract = {family: saved_weights(model, Path(folder) / family)["weights"]
                    for family, model in converted_models().items()}
    CONTRACT.write_text(json.dumps(contract, indent=1) + "\n")
    print(f"wrote {CONTRACT}")
