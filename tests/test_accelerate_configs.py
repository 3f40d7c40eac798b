"""The committed accelerate configs (conversion/accelerate/*.yaml): each one launches, through `accelerate launch
--config_file`, two processes whose accelerate state and FSDP / DeepSpeed plugin are built from its fields; the DDP
one distils a causal SEA model. No GPU here: the processes join one gloo group (FSDP itself needs GPUs: accelerate
runs an FSDP config's CPU processes as DDP), so FSDP v2 itself shards a SEA Llama as fsdp.yaml configures it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from test_distill import run, weights

from training.data import packaged_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "conversion" / "accelerate").glob("*.yaml"))
PROBE = str(REPO / "tests" / "accelerate_probe.py")
FSDP_GRADIENTS = str(REPO / "tests" / "fsdp_gradients.py")


def launch(launcher: list[str], script: str, *args: str) -> list[dict]:
    """Each process's JSON line from `launcher script args` (2 processes), by rank."""
    command = [sys.executable, "-m", *launcher, script, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return sorted(lines, key=lambda line: line["rank"])


def test_the_configs_are_ddp_fsdp_and_deepspeed_zero2():
    assert [config.name for config in CONFIGS] == ["ddp.yaml", "deepspeed_zero2.yaml", "fsdp.yaml"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.stem)
def test_a_config_launches_two_bf16_processes_with_its_plugin(config):
    cluster = load_config_from_file(str(config))  # refuses a field accelerate does not know
    assert (cluster.num_machines, cluster.num_processes, cluster.mixed_precision) == (1, 2, "bf16")
    if cluster.distributed_type == DistributedType.MULTI_GPU:
        return  # ddp.yaml has no plugin: test_the_ddp_config_distils_a_causal_sea_model_in_two_processes launches it
    if cluster.distributed_type == DistributedType.DEEPSPEED:
        pytest.importorskip("deepspeed")
    ranks = launch(["accelerate.commands.launch", "--config_file", str(config)], PROBE)
    assert [(r["rank"], r["processes"], r["backend"], r["mixed_precision"]) for r in ranks] == [
        (0, 2, "gloo", "bf16"), (1, 2, "gloo", "bf16")]
    plugin = {k: v for k, v in ranks[0].items() if k not in ("rank", "processes", "backend", "mixed_precision")}
    if cluster.distributed_type == DistributedType.FSDP:
        # The layer class resolved in a converted SEA Llama (SEA keeps the dense family's decoder layers).
        assert plugin == {"fsdp_version": 2, "wraps": ["LlamaDecoderLayer"], "reshard_after_forward": False,
                          "state_dict_type": "FULL_STATE_DICT"}
    elif cluster.distributed_type == DistributedType.DEEPSPEED:
        assert plugin["zero_stage"] == 2
        # The Trainer fills what the file leaves to it.
        ds = plugin["deepspeed_config"]
        assert ds["gradient_accumulation_steps"] == ds["gradient_clipping"] == "auto"
    else:
        raise AssertionError(f"{config.name}: unexpected distributed type {cluster.distributed_type}")


def test_the_ddp_config_distils_a_causal_sea_model_in_two_processes(tmp_path, tiny_opt_lm):
    """The estimator's attention losses reach it through hooks, outside the model's outputs: DDP must not search
    for unused parameters (distill.find_unused_parameters), or the first backward fails."""
    text = str(packaged_file("gensim", "test", "test_data", "lee_background.cor"))
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "conversion" /
                "accelerate" / "ddp.yaml")]
    run(["--model", tiny_opt_lm, "--dataset-path", text, "--max-steps", "2", "--per-device-train-batch-size", "2",
         "--max-length", "32", "--max-eval-tokens", "64", "--baseline", "false", "--save-steps", "2",
         "--output-dir", str(out)], launcher)
    summary = json.loads((out / "eval_results.json").read_text())["training"]
    assert (summary["processes"], summary["ranks_have_identical_weights"]) == (2, True)
    assert weights(out)


def test_fsdp_as_configured_gives_the_estimator_its_whole_batch_gradient():
    """Two gloo processes shard a converted SEA Llama with FSDP v2 as fsdp.yaml says. The estimator's attention losses
    reach each layer's parameters past FSDP's hooks on the layer's outputs, so the parameters must stay gathered
    from the forward to the backward (`fsdp_reshard_after_forward: false`); resharded, backward reads freed ones."""
    ranks = launch(["torch.distributed.run", "--nproc_per_node", "2"], FSDP_GRADIENTS, str(REPO / "conversion" /
                   "accelerate" / "fsdp.yaml"))
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["wrapped"] and r["same_parameters"] and r["max_difference"] < 1e-6, r
        assert "data is not allocated" in r["resharding_after_forward"], r
