"""conversion/convert.py's command line: the saved dtype, the checks made before the dense model loads, and the
modes of the folder it writes."""

import json
import os
import stat
import time
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, OPTForCausalLM

from conftest import TINY_LLAMA, tiny_opt_config
from conversion.convert import SEA_FLAGS, convert_to_sea, main as convert_main, model_path_problem, save_atomically
from sea.configuration_sea import SEA_FIELD_RULES, SeaConfigMixin, SeaLlamaConfig
from test_hub_roundtrip import run_without_project

SEA_DEFAULTS = {field.name: field.default for field in fields(SeaConfigMixin)}
# A value other than the config's default for every SEA field, all accepted by a causal model together.
SEA_NON_DEFAULTS = dict(
    sea_key_budget=5, sea_compressed_width=8, sea_performer_nb_factor=4.0, sea_budget_rule="reference",
    sea_bin_ranking="estimate", sea_candidate_factor=3, sea_output_gates=False, sea_anchor_bins=False, sea_query_block_size=16, sea_kernel="torch",
    sea_baseline="local_window", sea_block_ranking="window_max", sea_group_selection=True,
)
# A value the command lines refuse for each flag added for the fields they did not reach before.
BAD_NEW_FLAGS = [["--query-block-size", "3"], ["--kernel", "cuda"], ["--sea-baseline", "sea"], ["--anchor-bins=no"],
                 ["--block-ranking", "last_row"], ["--bin-ranking", "oracle"]]


def sea_flags(options: dict) -> list[str]:
    """The command-line flags that set the SEA fields to `options`."""
    argv = []
    for name, value in options.items():
        flag = SEA_FLAGS[name]
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            argv += [flag, str(value)]
    return argv


def saved_llama(folder, dtype=torch.float32) -> str:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype).save_pretrained(folder)
    return str(folder)


def convert(dense_dir, output_dir, *flags) -> dict:
    """Run the command line (the new SEA weights seeded alike every time) and return the saved config."""
    torch.manual_seed(1)
    convert_main(["--model", str(dense_dir), "--output-dir", str(output_dir), *flags])
    return json.loads((output_dir / "config.json").read_text())


def test_dtype_bfloat16_saves_what_a_float32_conversion_cast_to_bfloat16_computes(tmp_path):
    dense = saved_llama(tmp_path / "dense")
    assert convert(dense, tmp_path / "bf16", "--dtype", "bfloat16")["dtype"] == "bfloat16"
    assert convert(dense, tmp_path / "fp32", "--dtype", "float32")["dtype"] == "float32"
    bf16, fp32 = (load_file(tmp_path / name / "model.safetensors") for name in ("bf16", "fp32"))
    assert {tensor.dtype for tensor in bf16.values() if tensor.is_floating_point()} == {torch.bfloat16}
    assert bf16.keys() == fp32.keys() and all(torch.equal(bf16[k], fp32[k].to(bf16[k].dtype)) for k in bf16)
    # 40 tokens, within the default key budget (64): attention is exact, so no key choice can flip with rounding.
    torch.save(torch.randint(3, 120, (2, 40)), tmp_path / "ids.pt")
    # Cast by from_pretrained, not by .to(): that would also round RoPE's float32 inv_freq buffer to bfloat16.
    run_without_project(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        bf16 = AutoModelForCausalLM.from_pretrained({str(tmp_path / "bf16")!r}, trust_remote_code=True)
        fp32 = AutoModelForCausalLM.from_pretrained({str(tmp_path / "fp32")!r}, trust_remote_code=True)
        cast = AutoModelForCausalLM.from_pretrained({str(tmp_path / "fp32")!r}, trust_remote_code=True,
                                                    dtype=torch.bfloat16)
        assert bf16.dtype == cast.dtype == torch.bfloat16 and fp32.dtype == torch.float32
        ids = torch.load("ids.pt")
        with torch.no_grad():
            got, want, exact = bf16(ids).logits, cast(ids).logits, fp32(ids).logits
        torch.testing.assert_close(got, want)  # bfloat16's own tolerance
        assert (got.float() - exact).abs().max() <= 2e-2 * exact.abs().max()  # rounding alone
        """,
        tmp_path,
    )


def test_dtype_auto_keeps_the_checkpoints_own(tmp_path):
    assert convert(saved_llama(tmp_path / "fp32", torch.float32), tmp_path / "out32")["dtype"] == "float32"
    assert convert(saved_llama(tmp_path / "bf16", torch.bfloat16), tmp_path / "out16")["dtype"] == "bfloat16"
    assert load_file(tmp_path / "out16" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16


def expect_refusal(argv, capsys, *fragments):
    """The command line stops with a usage error holding every fragment, before any weights load (< 5 s)."""
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        convert_main(argv)
    assert exit_info.value.code == 2
    assert time.monotonic() - start < 5
    message = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage lines, then one error line
    assert ": error: " in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_every_sea_field_has_one_rule_and_one_flag():
    assert set(SEA_FIELD_RULES) == set(SEA_FLAGS) == set(SEA_NON_DEFAULTS) == set(SEA_DEFAULTS)
    assert all(SEA_NON_DEFAULTS[name] != default for name, default in SEA_DEFAULTS.items())


def test_every_sea_field_reaches_the_saved_config_with_the_configs_default(tmp_path):
    dense = saved_llama(tmp_path / "dense")
    convert(dense, tmp_path / "default")
    config = SeaLlamaConfig.from_pretrained(tmp_path / "default")  # config.json holds only what differs from them
    assert {name: getattr(config, name) for name in SEA_DEFAULTS} == SEA_DEFAULTS
    saved = convert(dense, tmp_path / "set", *sea_flags(SEA_NON_DEFAULTS))
    assert {name: saved[name] for name in SEA_DEFAULTS} == SEA_NON_DEFAULTS
    # The underscore spelling of distill.py's HfArgumentParser flags works here too.
    assert convert(dense, tmp_path / "underscore", "--key_budget", "7")["sea_key_budget"] == 7


@pytest.mark.parametrize("bad", BAD_NEW_FLAGS, ids=lambda bad: bad[0])
def test_a_bad_value_of_a_new_sea_flag_is_refused_naming_it(bad, tmp_path, capsys):
    flag = bad[0].split("=")[0]
    expect_refusal(["--model", str(tmp_path), "--output-dir", str(tmp_path / "out"), *bad], capsys, flag)


def test_missing_local_path_is_refused_naming_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "./sea-opt" is relative to here, and missing
    out = ["--output-dir", str(tmp_path / "out")]
    expect_refusal(["--model", "./sea-opt", *out], capsys, "--model ./sea-opt", "no such folder")
    expect_refusal(["--model", str(tmp_path / "missing"), *out], capsys, "--model", "no such folder")
    dense = saved_llama(tmp_path / "dense")
    expect_refusal(["--model", dense, "--gguf-file", "model.gguf", *out], capsys, "--gguf-file model.gguf")
    expect_refusal(["--model", f"{dense}/model.safetensors", *out], capsys, "is a file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["facebook/opt-125m", "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_a_hub_id_is_not_taken_for_a_missing_path(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_path_problem(model) is None


@pytest.mark.parametrize("model", ["./opt", "../opt", "/nowhere/opt", "~/opt", "outputs/sea/opt"])
def test_a_missing_path_that_is_no_hub_id_is_a_mistake(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert f"--model {model}: no such folder" in model_path_problem(model)


def test_bad_sea_options_and_models_are_refused_before_the_weights_load(tmp_path, capsys):
    dense = saved_llama(tmp_path / "dense")
    # Unreadable weights: a command that loaded them before checking its options would fail on them instead.
    (tmp_path / "dense" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="header"):
        convert_to_sea(dense)
    out = ["--output-dir", str(tmp_path / "out")]
    expect_refusal(["--model", dense, "--key-budget", "0", *out], capsys, "--key-budget must be an integer >= 1")
    expect_refusal(["--model", dense, "--compressed-width", "10", *out], capsys, "--compressed-width", "multiple of 4")
    expect_refusal(["--model", dense, "--performer-nb-factor", "0", *out], capsys, "--performer-nb-factor")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    expect_refusal(["--model", str(tmp_path / "gpt2"), *out], capsys, "'gpt2'", "supported types")
    (tmp_path / "no-config").mkdir()
    expect_refusal(["--model", str(tmp_path / "no-config"), *out], capsys, "--model", "cannot load its config")
    # A SEA model's config reads as its dense family's without the remote code: refused as what it is.
    convert_to_sea(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))).save_pretrained(tmp_path / "sea")
    expect_refusal(["--model", str(tmp_path / "sea"), *out], capsys, "already a SEA model")
    assert not (tmp_path / "out").exists()


def modes(folder) -> dict[str, int]:
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.rglob("*")]}


def add_plots(folder):
    (folder / "plots").mkdir()
    (folder / "plots" / "attention.svg").write_text("<svg/>")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_written_folders_follow_the_umask(umask, tmp_path):
    previous = os.umask(umask)
    try:
        convert(saved_llama(tmp_path / "dense"), tmp_path / "converted")
        # distill.py's final folder: save_atomically with a plots subfolder added by `populate`.
        save_atomically(OPTForCausalLM(tiny_opt_config(dense=True)), tmp_path / "distilled", populate=add_plots)
    finally:
        os.umask(previous)
    for folder in (tmp_path / "converted", tmp_path / "distilled"):
        got = modes(folder)
        assert "model.safetensors" in got
        want = {name: (0o777 if (folder / name).is_dir() else 0o666) & ~umask for name in got}
        assert got == want
