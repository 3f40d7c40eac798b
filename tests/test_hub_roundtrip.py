"""save_pretrained / from_pretrained, the remote-code load in a fresh process, conversion CLI, config errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel, OPTForCausalLM
from transformers.dynamic_module_utils import get_imports

from conftest import tiny_bert_config, tiny_opt_config
from conversion.convert import convert_to_sea, main as convert_main
from sea.configuration_sea import SeaBertConfig, SeaOptConfig
from sea.modeling_sea import SeaBertForSequenceClassification, SeaOptForCausalLM

BUNDLE = {"configuration_sea.py", "modeling_sea.py", "sea_attention.py", "sea_cache.py", "sea_dispatch.py",
          "sea_estimate_kernels.py", "sea_layer.py", "sea_sparse_kernels.py"}
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_without_project(code: str, cwd: Path) -> str:
    """Run `code` in a fresh interpreter where the project cannot be imported and the Hub is offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    # The installed project is made unimportable, so only the code saved beside the weights can serve.
    prelude = "import sys\nsys.modules['sea'] = None; sys.modules['conversion'] = None\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL,  # a question to the user (transformers' remote-code prompt) gets no answer
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_opt_save_then_remote_code_load_in_fresh_process(tmp_path):
    dense = OPTForCausalLM(tiny_opt_config(dense=True)).eval()
    sea = convert_to_sea(dense, sea_key_budget=8, sea_compressed_width=8)
    with torch.no_grad():
        for name, param in sea.named_parameters():  # trained-looking SEA weights, so a lost one shows
            if ".sea." in name:
                param.add_(torch.randn_like(param) * 0.1)
    out_dir = tmp_path / "sea-opt"
    sea.save_pretrained(out_dir)
    assert BUNDLE <= {p.name for p in out_dir.iterdir()}
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "opt"  # the dense family's: stock tools read it as OPT (see the tokenizer test)
    assert config["auto_map"] == {
        "AutoConfig": "configuration_sea.SeaOptConfig",
        "AutoModel": "modeling_sea.SeaOptModel",
        "AutoModelForCausalLM": "modeling_sea.SeaOptForCausalLM",
    }
    saved = load_file(out_dir / "model.safetensors")
    assert any(".sea.feature_projection" in k for k in saved), "the random-feature projection must be saved"
    ids = torch.randint(3, 120, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = sea(ids, attention_mask=mask).logits
        # In process: the same classes load it with every weight present.
        reloaded, info = SeaOptForCausalLM.from_pretrained(out_dir, output_loading_info=True)
        assert not any(info.values()), info
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, expected, atol=0, rtol=0)
    torch.save(expected, tmp_path / "expected.pt")
    stdout = run_without_project(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        config = AutoConfig.from_pretrained({str(out_dir)!r}, trust_remote_code=True)
        assert type(config).__name__ == "SeaOptConfig" and config.sea_key_budget == 8
        model, info = AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True, output_loading_info=True)
        assert not any(info.values()), info
        assert type(model).__name__ == "SeaOptForCausalLM" and type(model).__module__.startswith("transformers_modules")
        inputs = torch.load("inputs.pt")
        with torch.no_grad():
            logits = model(inputs["ids"], attention_mask=inputs["mask"]).logits
        assert torch.equal(logits, torch.load("expected.pt")), (logits - torch.load("expected.pt")).abs().max()
        base = AutoModel.from_pretrained({str(out_dir)!r}, trust_remote_code=True)
        print(type(base).__name__)
        """,
        tmp_path,
    )
    assert stdout.strip() == "SeaOptModel"


def test_remote_code_loads_and_runs_where_triton_cannot_be_imported(tmp_path):
    """CPU and Mac users may have no Triton: the Hub loader's import check, which skips imports inside try blocks,
    finds no Triton import in any bundle file, and the saved model loads and runs on the PyTorch path."""
    sea = convert_to_sea(OPTForCausalLM(tiny_opt_config(dense=True)).eval(), sea_key_budget=8, sea_compressed_width=8)
    out_dir = tmp_path / "sea-opt"
    sea.save_pretrained(out_dir)
    for file in sorted(out_dir.glob("*.py")):
        assert "triton" not in get_imports(file), file.name
    ids = torch.randint(3, 120, (2, 20))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(sea(ids).logits, tmp_path / "expected.pt")
    run_without_project(
        f"""
        import sys
        sys.modules["triton"] = None  # any import of Triton fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True)
        dispatch = next(m for name, m in sys.modules.items() if name.endswith(".sea_dispatch"))
        assert not dispatch.TRITON_AVAILABLE
        with torch.no_grad():
            assert torch.equal(model(torch.load("ids.pt")).logits, torch.load("expected.pt"))
        """,
        tmp_path,
    )


def test_real_minilm_converts_and_loads_with_remote_code(tmp_path, minilm_path):
    """The packaged pretrained BERT (MiniLM) through the conversion CLI, then back through trust_remote_code."""
    out_dir = tmp_path / "sea-minilm"
    convert_main(["--model", minilm_path, "--output-dir", str(out_dir), "--num-labels", "2", "--key-budget", "512"])
    files = {p.name for p in out_dir.iterdir()}
    assert BUNDLE <= files and "model.safetensors" in files and "tokenizer.json" in files
    assert not any(p.name.startswith(".sea-minilm") for p in tmp_path.iterdir()), "staging folder left behind"
    config = json.loads((out_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_sea.SeaBertForSequenceClassification"

    # Full budget: the SEA encoder reproduces the real pretrained encoder's hidden states.
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    batch = tokenizer(
        ["A real sentence about sparse attention.", "Short one.", "The estimated mask picks the keys that matter."],
        padding=True, return_tensors="pt",
    )
    dense = AutoModel.from_pretrained(minilm_path).eval()
    sea = SeaBertForSequenceClassification.from_pretrained(out_dir).eval()
    with torch.no_grad():
        expected = dense(**batch).last_hidden_state
        got = sea.bert(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert (got - expected)[valid].abs().max() <= 1e-4

    torch.save(dict(batch), tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(sea(**batch).logits, tmp_path / "expected.pt")
    run_without_project(
        f"""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoModel
        model = AutoModelForSequenceClassification.from_pretrained({str(out_dir)!r}, trust_remote_code=True)
        with torch.no_grad():
            logits = model(**torch.load("batch.pt")).logits
        assert torch.equal(logits, torch.load("expected.pt"))
        assert type(AutoModel.from_pretrained({str(out_dir)!r}, trust_remote_code=True)).__name__ == "SeaBertModel"
        """,
        tmp_path,
    )


def test_stock_tools_read_a_converted_folder_as_its_dense_family(tmp_path, minilm_path):
    """A converted folder's config carries its dense family's `model_type`, so code that does not run the remote
    code reads it as that family: stock `AutoTokenizer` loads the tokenizer without asking whether to run custom
    code (transformers reads `config.json` first, and asks, waiting 15 s, about any model type it does not know),
    and without `trust_remote_code` the Auto classes give the dense family's own classes over the same weights,
    as transformers does for any repository whose code it has (the SEA weights stay unused); with it, SEA's."""
    out_dir = tmp_path / "sea-minilm"
    convert_main(["--model", minilm_path, "--output-dir", str(out_dir), "--num-labels", "2", "--key-budget", "8"])
    stdout = run_without_project(
        f"""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        path = {str(out_dir)!r}
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer(["a fine film"])["input_ids"][0][0] == tokenizer.cls_token_id
        config = AutoConfig.from_pretrained(path)
        assert type(config).__name__ == "BertConfig" and config.sea_key_budget == 8, config
        assert type(AutoModelForSequenceClassification.from_pretrained(path)).__name__ == "BertForSequenceClassification"
        sea = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
        print(type(sea).__name__)
        """,
        tmp_path,
    )
    assert stdout.strip() == "SeaBertForSequenceClassification", stdout


def test_small_budget_on_real_minilm_is_finite_and_sparse(minilm_path):
    sea = convert_to_sea(minilm_path, num_labels=2, sea_key_budget=8, sea_compressed_width=16)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    text = " ".join(["Sparse attention keeps the keys that matter and drops the rest."] * 6)
    batch = tokenizer([text, "A short second sentence."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = sea(**batch, output_attentions=True)
    assert torch.isfinite(out.logits).all()
    padded_keys = ~batch["attention_mask"].bool()
    for probs in out.attentions:
        assert ((probs > 0).sum(-1) <= 8).all(), "a query attended to more keys than its budget"
        assert probs[1][:, :, padded_keys[1]].abs().sum() == 0, "a padded key was attended"
        # Fresh gates are neutral, so every query's sparse probabilities sum to one.
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)


def test_unsupported_checkpoint_gets_clear_error(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2'.*supported types are 'opt'.*'bert'"):
        convert_to_sea(tmp_path / "gpt2")


def test_cli_refuses_to_overwrite_output(tmp_path, capsys):
    dense_dir = tmp_path / "dense"
    OPTForCausalLM(tiny_opt_config(dense=True)).save_pretrained(dense_dir)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        convert_main(["--model", str(dense_dir), "--output-dir", str(tmp_path / "out")])
    assert "--overwrite-output-dir" in capsys.readouterr().err
    convert_main(["--model", str(dense_dir), "--output-dir", str(tmp_path / "out"), "--overwrite-output-dir"])
    assert SeaOptConfig.from_pretrained(tmp_path / "out").sea_key_budget == 64


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("sea_compressed_width", 0, "sea_compressed_width"),
        ("sea_compressed_width", 10, "multiple of 4"),
        ("sea_key_budget", 0, "sea_key_budget.*>= 1"),
        ("sea_key_budget", -3, "sea_key_budget"),
        ("sea_budget_rule", "topk", "sea_budget_rule.*constant.*reference"),
        ("sea_performer_nb_factor", 0.0, "sea_performer_nb_factor.*> 0"),
        ("sea_kernel", "cuda", "sea_kernel.*auto.*triton.*torch"),
        ("sea_key_budget", True, "sea_key_budget.*integer"),
        ("sea_anchor_bins", "yes", "sea_anchor_bins.*True or False"),
        ("sea_output_gates", "no", "sea_output_gates.*True or False"),
        ("sea_bin_ranking", "oracle", "sea_bin_ranking.*key_summaries.*estimate"),
        ("sea_baseline", "key_summaries", "sea_baseline.*content rankings are values of `sea_bin_ranking`"),
        ("hidden_size", 100, "hidden_size.*num_attention_heads"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SeaOptConfig(**{field: value})


@pytest.mark.parametrize("saved_baseline, saved_factor, ranking, baseline, factor", [
    (None, None, "estimate", None, 1), ("oracle", 3, "estimate", "oracle", 3), ("key_bounds", 1, "key_bounds", None, 1)])
def test_a_config_saved_before_bin_rankings_keeps_its_ranking(tmp_path, saved_baseline, saved_factor, ranking, baseline,
                                                              factor):
    """A config.json written before `sea_bin_ranking` existed (no such key) ranked bins by SEA's estimate, or by the
    content ranking its `sea_baseline` named, and one written before `sea_candidate_factor` existed re-ranked
    nothing: loaded, it selects the same way; a config that has the key keeps it."""
    config = tiny_opt_config().to_dict()
    del config["sea_bin_ranking"], config["sea_candidate_factor"]
    config["sea_baseline"] = saved_baseline
    if saved_factor is not None:
        config["sea_candidate_factor"] = saved_factor
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = SeaOptConfig.from_pretrained(tmp_path)
    assert (loaded.sea_bin_ranking, loaded.sea_baseline, loaded.sea_candidate_factor) == (ranking, baseline, factor)
    tiny_opt_config().save_pretrained(tmp_path)  # the default ranking is written out, and read back as it is
    assert SeaOptConfig.from_pretrained(tmp_path).sea_bin_ranking == "key_summaries"


def test_bert_config_validation_and_save_time_check(tmp_path):
    with pytest.raises(ValueError, match="multiple of 2"):
        SeaBertConfig(sea_compressed_width=7)
    with pytest.raises(ValueError, match="is_decoder"):
        SeaBertConfig(is_decoder=True)
    config = tiny_bert_config(sea_key_budget=16)
    config.sea_key_budget = 0  # changed after construction: caught before anything is written
    with pytest.raises(ValueError, match="sea_key_budget"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
