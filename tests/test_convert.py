"""conversion/convert.py's command line: the dtype of the model it saves."""

import json

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TINY_LLAMA
from conversion.convert import main as convert_main
from test_hub_roundtrip import run_without_project


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
