"""conversion/distill.py end to end on tiny models and the packaged real data: 2-process (gloo) training against a
1-process run, a real kill then --resume, TensorBoard logging, and the errors raised before any training."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config

from conversion import distill
from conversion.convert import convert_to_sea
from test_convert import BAD_NEW_FLAGS, SEA_DEFAULTS, SEA_NON_DEFAULTS, sea_flags
from training.data import packaged_file

REPO = Path(__file__).resolve().parents[1]
DISTILL = str(REPO / "conversion" / "distill.py")
FAST = ["--max-steps", "6", "--per-device-train-batch-size", "4", "--per-device-eval-batch-size", "16",
        "--baseline", "false", "--logging-steps", "2", "--save-steps", "3", "--max-length", "32"]


def run(args: list[str], launcher: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run distill.py in a fresh process (offline unless `env` says otherwise); it must succeed."""
    command = (launcher or [sys.executable]) + [DISTILL] + args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def kill_once_written(args: list[str], marker: Path):
    """Run distill.py in a fresh process and SIGKILL it as soon as `marker` (a checkpoint file) exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, DISTILL] + args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), f"the run ended before writing {marker}"


def weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "model.safetensors")


def relative_distance(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(a[k].double().norm() ** 2) for k in a)
    return (num / den) ** 0.5


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_bert_classifier, tiny_opt_lm):
    common = ["--model", tiny_bert_classifier] + FAST
    # Accelerate's --multi_gpu launcher is torchrun; without a GPU the processes join one gloo group.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = tmp_path / "two"
    run(common + ["--output-dir", str(two), "--per-device-train-batch-size", "2"], launcher)
    one = tmp_path / "one"
    run(common + ["--output-dir", str(one), "--per-device-train-batch-size", "4"])

    summary = json.loads((two / "eval_results.json").read_text())
    assert summary["training"]["processes"] == 2
    assert summary["training"]["ranks_have_identical_weights"] is True
    # Both runs start from the same converted student; training must move it, and move it the same way.
    start = tmp_path / "start"
    run(common + ["--output-dir", str(start), "--max-steps", "0"])
    moved = relative_distance(weights(one), weights(start))
    assert moved > 1e-4
    assert relative_distance(weights(two), weights(one)) < 0.05 * moved

    # The distilled folder loads through remote code in a process where the project is not importable.
    code = (
        "import sys; sys.modules['sea'] = None; sys.modules['conversion'] = None\n"
        "import torch; from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"path = {str(two)!r}\n"
        "model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)\n"
        "batch = AutoTokenizer.from_pretrained(path, trust_remote_code=True)(['a fine film', 'dull'], padding=True, return_tensors='pt')\n"
        "print(type(model).__name__, torch.isfinite(model(**batch).logits).all().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.stdout.split() == ["SeaBertForSequenceClassification", "True"], out.stderr[-3000:]


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_opt_lm):
    text = str(packaged_file("gensim", "test", "test_data", "lee_background.cor"))
    common = ["--model", tiny_opt_lm, "--dataset-path", text, "--max-steps", "40", "--save-steps", "10",
              "--per-device-train-batch-size", "2", "--max-length", "64", "--logging-steps", "10",
              "--max-eval-tokens", "512", "--baseline", "false"]
    reference = tmp_path / "uninterrupted"
    run(common + ["--output-dir", str(reference)])

    killed = tmp_path / "killed"
    first_checkpoint = Path(f"{killed}-checkpoints") / "sea" / "checkpoint-10" / "trainer_state.json"
    kill_once_written(common + ["--output-dir", str(killed)], first_checkpoint)
    assert not killed.exists(), "the run finished before it was killed; the test needs a longer run"

    # A later checkpoint cut short by a kill while saving: no trainer state yet, truncated weights.
    checkpoints = first_checkpoint.parents[1]
    if not (checkpoints / "checkpoint-20").exists():
        shutil.copytree(checkpoints / "checkpoint-10", checkpoints / "checkpoint-20")
        (checkpoints / "checkpoint-20" / "trainer_state.json").unlink()
    (checkpoints / "checkpoint-20" / "model.safetensors").write_bytes(b"\0" * 100)
    resumed_run = run(common + ["--output-dir", str(killed), "--resume"])
    assert "--resume skips" in resumed_run.stderr and "checkpoint-20" in resumed_run.stderr
    resumed, uninterrupted = weights(killed), weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)
    summary = json.loads((killed / "eval_results.json").read_text())
    assert summary["training"]["steps"] == 40
    assert summary["evaluation"]["teacher (dense)"]["tokens_scored"] == 511


def test_teacher_fine_tuning_killed_midway_resumes_to_the_same_teacher(tmp_path, minilm_path):
    """A BERT checkpoint without a classification head: its task fine-tuning checkpoints like the distillation, and
    a run killed during it resumes there and ends with the teacher an uninterrupted run fine-tunes."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from conftest import TINY_BERT

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    headless = tmp_path / "headless-bert"
    BertModel(BertConfig(**{**TINY_BERT, "vocab_size": tokenizer.vocab_size})).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    common = ["--model", str(headless), "--teacher-finetune-steps", "60", "--save-steps", "5", "--max-steps", "2",
              "--per-device-train-batch-size", "4", "--baseline", "false", "--max-length", "32"]
    reference = tmp_path / "uninterrupted"
    run(common + ["--output-dir", str(reference)])

    killed = tmp_path / "killed"
    first_checkpoint = Path(f"{killed}-checkpoints") / "teacher-run" / "checkpoint-5" / "trainer_state.json"
    kill_once_written(common + ["--output-dir", str(killed)], first_checkpoint)
    teacher = Path(f"{killed}-checkpoints") / "teacher" / "model.safetensors"
    assert not teacher.exists(), "the teacher finished before the kill; the test needs a longer fine-tuning"

    run(common + ["--output-dir", str(killed), "--resume"])
    resumed, uninterrupted = load_file(teacher), weights(Path(f"{reference}-checkpoints") / "teacher")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)


def test_lora_run_merges_adapters_and_logs_to_tensorboard(tmp_path, tiny_bert_classifier):
    run(["--model", tiny_bert_classifier, *FAST, "--output-dir", str(tmp_path / "out"), "--report-to", "tensorboard",
         "--train-parameters", "lora", "--learning-rate", "1e-2"])
    start = convert_to_sea(tiny_bert_classifier, sea_key_budget=8, sea_compressed_width=16).state_dict()
    distilled = weights(tmp_path / "out")
    assert distilled.keys() == start.keys()  # adapters merged into the plain SEA weights
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(distilled[query], start[query])  # the LoRA update landed in the base weight
    logs = tmp_path / "out-checkpoints" / "sea"  # the Trainer's default: <its output_dir>/runs/<date_host>
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list(logs.rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/loss_estimate_kl", "train/loss_logits_kd"} <= tags


def expect_error(argv, capsys, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        distill.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in message, message


def test_every_sea_field_is_a_flag_with_the_configs_default():
    """Only the packaged run's key budget and bin count are distill.py's own (SEA_DEFAULTS says why)."""
    assert distill.parse_arguments([])[1] == {**SEA_DEFAULTS, **distill.SEA_DEFAULTS}
    assert distill.parse_arguments(sea_flags(SEA_NON_DEFAULTS))[1] == SEA_NON_DEFAULTS
    assert distill.parse_arguments(["--key_budget", "7"])[1]["sea_key_budget"] == 7  # HfArgumentParser's spelling


@pytest.mark.parametrize("bad", BAD_NEW_FLAGS, ids=lambda bad: bad[0])
def test_a_bad_value_of_a_new_sea_flag_is_refused_naming_it(bad, tmp_path, capsys):
    expect_error([*bad, "--output-dir", str(tmp_path / "out")], capsys, bad[0].split("=")[0])


def test_errors_before_training(tmp_path, capsys, tiny_bert_classifier, tiny_opt_lm, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out")]
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    expect_error(["--model", str(gpt2), *out], capsys, "'gpt2'", "supported types")
    expect_error(["--model", tiny_bert_classifier, "--task", "causal-lm", *out], capsys, "--task causal-lm", "OPT")
    expect_error(["--model", tiny_opt_lm, "--dataset-path", str(tmp_path / "missing.txt"), *out], capsys, "not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_error(["--model", tiny_opt_lm, "--dataset-path", str(empty), *out], capsys, "no training examples")
    expect_error(["--model", tiny_bert_classifier, "--max-length", "100000", *out], capsys,
                 "--max-length 100000", "max_position_embeddings=256")
    zero_weights = [f"--{name.replace('_', '-')}=0" for name in ("task_loss_weight", "logits_kd_weight",
                    "estimate_kl_weight", "estimate_mse_weight", "sparse_kl_weight", "sparse_mse_weight")]
    expect_error(["--model", tiny_bert_classifier, *zero_weights, *out], capsys, "At least one loss weight must be > 0")
    expect_error(["--model", tiny_bert_classifier, "--compressed-width", "7", *out], capsys,
                 "--compressed-width must be a positive multiple of 2")
    expect_error(["--model", tiny_opt_lm, "--key-budget", "0", *out], capsys, "--key-budget must be an integer >= 1")
    expect_error(["--model", tiny_opt_lm, "--max-length", "1", *out], capsys, "--max-length must be at least 2")
    words = tmp_path / "words.csv"
    words.write_text("sentence,label\n" + "".join(f"text number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    expect_error(["--model", tiny_bert_classifier, "--dataset-path", str(words), *out], capsys,
                 "--label-column 'label' must hold the class ids 0 .. K-1", "'neg', 'pos'")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("an earlier run's model")
    expect_error(["--model", tiny_bert_classifier, *out], capsys, "already exists", "--overwrite-output-dir")
    # A run that fails its checks loses nothing, even when asked to replace the earlier output.
    expect_error(["--model", tiny_bert_classifier, "--overwrite-output-dir", "--compressed-width", "7", *out], capsys,
                 "--compressed-width")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "an earlier run's model"
    expect_error(["--model", tiny_bert_classifier, "--output-dir", str(tmp_path / "fresh"), "--resume"], capsys,
                 "no checkpoint")
    # An unreachable Hub (nothing listens on the discard port), and no local folder of that name.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    expect_error(["--model", "someone/not-on-disk", "--output-dir", str(tmp_path / "hub")], capsys,
                 "someone/not-on-disk", "local checkpoint folder")
    expect_error(["--model", tiny_bert_classifier, "--dataset", "glue", "--dataset-config", "sst2",
                  "--output-dir", str(tmp_path / "hub")], capsys, "glue", "--dataset-path")
