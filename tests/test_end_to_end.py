"""benchmarks/end_to_end.py --smoke on the CPU: every planned cell measured and reported, and a second run over the
same work dir measures nothing (it builds no model) and reports the same cells; a cell left unfinished, out of time
or out of memory is stored as such, and a work dir refuses cells of other settings."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import end_to_end


@pytest.fixture
def one_thread():
    """Timing is not the point here: on a shared CPU, threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_reports_every_cell_and_a_second_run_measures_none(tmp_path, monkeypatch, one_thread):
    work, output = tmp_path / "work", tmp_path / "report"
    argv = ["--smoke", "--work-dir", str(work), "--output", str(output)]
    end_to_end.main(argv)

    args = end_to_end.parse_arguments(argv)
    available = [v for v in args.variants if end_to_end.backend_problem(v, "cpu", torch.float32) is None]
    assert {"sdpa_flash", "sdpa_math", "static_compiled", "sea"} <= set(available)  # what the CPU can run
    expected = {end_to_end.cell_name(key) for key in end_to_end.cell_plan(args) if key["variant"] in available}
    report = json.loads(output.with_suffix(".json").read_text())
    cells = {end_to_end.cell_name(cell): cell for cell in report["cells"]}
    assert set(cells) == expected
    assert all(cell["status"] == "ok" for cell in cells.values()), [c for c in cells.values() if c["status"] != "ok"]
    assert not any(cell["compiled"] for cell in cells.values() if cell["mode"] == "decode")  # no compile on the CPU
    for cell in cells.values():  # each ratio is over the fastest dense variant of its row: 1 for that one
        if cell["variant"] != "sea":
            assert cell["speedup_vs_fastest_dense"] <= 1 + 1e-9
    assert report["settings"]["dtype"] == "float32" and report["versions"]["triton"]
    assert "sdpa_cudnn" in report["skipped"]
    markdown = output.with_suffix(".md").read_text()
    assert "## prefill" in markdown and "## decode" in markdown and "| tiny-opt | 2 | 96 |" in markdown
    assert output.with_suffix(".png").stat().st_size > 0

    stored = {path.name: path.read_text() for path in (work / "cells").glob("*.json")}
    monkeypatch.setattr(end_to_end, "dense_model", lambda *args: pytest.fail("a stored cell was measured again"))
    end_to_end.main(argv)
    assert {path.name: path.read_text() for path in (work / "cells").glob("*.json")} == stored
    assert {end_to_end.cell_name(c) for c in json.loads(output.with_suffix(".json").read_text())["cells"]} == expected
    elsewhere = tmp_path / "elsewhere"  # the report of the stored cells, written with other defaults
    end_to_end.main(["--report-only", "--work-dir", str(work), "--output", str(elsewhere)])
    assert json.loads(elsewhere.with_suffix(".json").read_text())["cells"] == report["cells"]


def test_a_cell_left_unfinished_is_stored_as_such_and_other_settings_are_refused(tmp_path, one_thread):
    work = tmp_path / "work"
    argv = ["--smoke", "--work-dir", str(work), "--output", str(tmp_path / "report"), "--shapes", "tiny-llama",
            "--lengths", "48", "--batches", "1", "--modes", "prefill", "--variants", "sea"]
    key = next(end_to_end.cell_plan(end_to_end.parse_arguments(argv)))
    (work / "cells").mkdir(parents=True)
    (work / "cells" / f"{end_to_end.cell_name(key)}.started").touch()  # as a run killed inside the cell leaves it
    end_to_end.main(argv)
    assert json.loads((work / "cells" / f"{end_to_end.cell_name(key)}.json").read_text())["status"] == "unfinished"
    with pytest.raises(SystemExit, match="measured with"):
        end_to_end.main([*argv, "--key-budget", "8"])


def test_running_out_of_time_or_memory_is_a_result_not_a_crash(monkeypatch, one_thread):
    args = end_to_end.parse_arguments(["--smoke", "--cell-time-limit", "0"])
    model = end_to_end.dense_model("tiny-llama", args.max_positions, "cpu", torch.float32)
    key = {"shape": "tiny-llama", "batch": 1, "length": 48, "mode": "prefill", "variant": "sdpa_math"}
    assert end_to_end.measured_or_failed(model, key, args, "cpu")["status"] == end_to_end.OUT_OF_TIME

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(end_to_end, "measure", out_of_memory)
    assert end_to_end.measured_or_failed(model, key, args, "cpu") == {
        "status": "oom", "error": "CUDA out of memory. Tried to allocate 64.00 GiB"}
