"""Model cards and publishing, end to end against a Hub-compatible server on 127.0.0.1 driven by the real
`huggingface_hub` client: distil with --push-to-hub, load back from the server in a fresh process, push again,
push to a branch, and a refused token."""

import json
import os
import re
import subprocess
import sys

import pytest
from huggingface_hub import EvalResult, HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from training.data import packaged_file
from hub_server import HubServer
from test_distill import FAST, REPO, run

TOKEN = "hf_test_write_token"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = HubServer(tmp_path / "hub", TOKEN).start()
    for key, value in hub_env(server).items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop()


def hub_env(server) -> dict:
    return {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(server.store.root.parent / "hf-home")}


@pytest.fixture(scope="module")
def distilled_bert(tmp_path_factory, tiny_bert_classifier):
    output = tmp_path_factory.mktemp("card") / "sea-bert"
    run(["--model", tiny_bert_classifier, *FAST, "--output-dir", str(output), "--base-model-id", "someone/tiny-bert",
         "--license", "apache-2.0"])
    return output


def test_card_metadata_and_body_from_a_real_distillation(distilled_bert):
    summary = json.loads((distilled_bert / "eval_results.json").read_text())
    card = ModelCard.load(distilled_bert / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.base_model == "someone/tiny-bert"
    assert data.license == "apache-2.0"
    assert data.pipeline_tag == "text-classification"
    assert {"sea", "sparse-attention", "custom_code", "bert"} <= set(data.tags)
    model_name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert model_name == "sea-bert"
    sea_metrics = summary["evaluation"]["sea (distilled)"]
    assert {r.metric_type: r.metric_value for r in results} == pytest.approx(
        {"accuracy": sea_metrics["accuracy"], "f1": sea_metrics["f1"]}, abs=1e-6)
    assert all(isinstance(r, EvalResult) and r.dataset_type == "pang_lee_polarity" for r in results)

    body = card.text
    assert "# sea-bert\n" in body and "This is **sea-bert**, a SEA version of" in body
    for section in ("## Usage", "## SEA configuration", "## Evaluation", "## Conversion cost", "## Limitations",
                    "## Citation", "@inproceedings{lee2024sea"):
        assert section in body, section
    assert "trust_remote_code=True" in body
    assert f"| `sea_key_budget` | {summary['sea_config']['sea_key_budget']} |" in body
    for name, metrics in summary["evaluation"].items():
        assert f"| {name} | " in body and f"{metrics['accuracy']:.4f}" in body
    assert f"{summary['training']['tokens_seen']:,} tokens" in body
    for plot in ("plots/scaling.png", "plots/attention.png"):
        assert f"]({plot})" in body
        assert (distilled_bert / plot).read_bytes().startswith(PNG_SIGNATURE)


def usage_snippet(card_text: str) -> str:
    return re.search(r"## Usage.*?```python\n(.*?)```", card_text, re.S).group(1)


def push_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "hub_cards" / "push.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_distill_pushes_and_the_model_loads_back_from_the_server(tmp_path, hub, tiny_opt_lm):
    output = tmp_path / "sea-opt"
    corpus = str(packaged_file("gensim", "test", "test_data", "lee_background.cor"))
    env = {**os.environ, **hub_env(hub)}
    run(["--model", tiny_opt_lm, "--dataset-path", corpus, *FAST, "--max-eval-tokens", "256",
         "--output-dir", str(output), "--push-to-hub", "user/sea-opt-tiny"], env=env)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    files = set(api.list_repo_files("user/sea-opt-tiny"))
    assert {"config.json", "model.safetensors", "configuration_sea.py", "modeling_sea.py", "sea_attention.py",
            "sea_cache.py", "sea_dispatch.py", "sea_estimate_kernels.py", "sea_layer.py", "sea_sparse_kernels.py",
            "tokenizer.json", "README.md", "eval_results.json", "plots/attention.png", "plots/scaling.png"} <= files
    assert len(hub.store.commits("user", "sea-opt-tiny")) == 1  # one commit for everything

    # The card's usage snippet runs as printed, against the server, in a process that cannot import the project.
    card_text = (output / "README.md").read_text()
    assert 'repo = "user/sea-opt-tiny"' in card_text
    compare = (
        "import sys; sys.modules['sea'] = None; sys.modules['conversion'] = None\n" + usage_snippet(card_text) +
        "\nlocal = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = tokenizer('some words of text', return_tensors='pt')\n"
        "print('max-diff', (model(**ids).logits - local(**ids).logits).abs().max().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", compare, str(output)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("max-diff")[-1]) == 0.0

    # Pushing again updates the repo in place, with one new commit.
    summary = json.loads((output / "eval_results.json").read_text())
    summary["training"]["steps"] = 12345
    (output / "eval_results.json").write_text(json.dumps(summary))
    pushed = push_cli(str(output), "user/sea-opt-tiny", env=env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert len(hub.store.commits("user", "sea-opt-tiny")) == 2
    assert set(api.list_repo_files("user/sea-opt-tiny")) == files
    card_on_hub = api.hf_hub_download("user/sea-opt-tiny", "README.md", cache_dir=tmp_path / "cache")
    assert "12345 optimizer steps" in open(card_on_hub).read()

    # A branch of a private repository.
    pushed = push_cli(str(output), "user/sea-opt-private", "--private", "--revision", "experiment", env=env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert api.repo_info("user/sea-opt-private").private is True
    assert {b.name for b in api.list_repo_refs("user/sea-opt-private").branches} == {"main", "experiment"}
    assert "config.json" in api.list_repo_files("user/sea-opt-private", revision="experiment")
    assert "config.json" not in api.list_repo_files("user/sea-opt-private")


def test_refused_token_and_unreachable_hub_are_clear_errors_that_leave_the_folder_intact(
    tmp_path, distilled_bert, hub, tiny_bert_classifier
):
    before = {p.relative_to(distilled_bert): p.read_bytes() for p in distilled_bert.rglob("*") if p.is_file()}
    env = {**os.environ, **hub_env(hub)}
    refused = push_cli(str(distilled_bert), "user/sea-bert", "--token", "hf_wrong", env=env)
    assert refused.returncode == 1
    assert "refused the token (401)" in refused.stderr and "re-run: python hub_cards/push.py" in refused.stderr
    assert not hub.store.exists("user", "sea-bert")

    unreachable = push_cli(str(distilled_bert), "user/sea-bert", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert unreachable.returncode == 1 and "Could not reach the Hub" in unreachable.stderr
    offline = push_cli(str(distilled_bert), "user/sea-bert", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "HF_HUB_OFFLINE is set" in offline.stderr
    # Refused at the commit, after the card was re-rendered for the repository: the card is put back.
    hub.store.quota_bytes = 1000
    over_quota = push_cli(str(distilled_bert), "user/sea-bert", env=env)
    assert over_quota.returncode == 1 and "storage limit" in over_quota.stderr, over_quota.stderr[-2000:]
    after = {p.relative_to(distilled_bert): p.read_bytes() for p in distilled_bert.rglob("*") if p.is_file()}
    assert before == after

    # distill.py checks the token before any training.
    started = subprocess.run(
        [sys.executable, str(REPO / "conversion" / "distill.py"), "--model", tiny_bert_classifier,
         "--output-dir", str(tmp_path / "out"), "--push-to-hub", "user/x"],
        cwd=REPO, env={**env, "HF_TOKEN": "hf_wrong"}, capture_output=True, text=True, timeout=300)
    assert started.returncode == 2 and "refused the token (401)" in started.stderr
    started = subprocess.run(
        [sys.executable, str(REPO / "conversion" / "distill.py"), "--model", tiny_bert_classifier,
         "--output-dir", str(tmp_path / "out"), "--push-to-hub", "user/x"],
        cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert started.returncode == 2 and "HF_HUB_OFFLINE is set" in started.stderr, started.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoints").exists()
