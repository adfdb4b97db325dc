#!/usr/bin/env bash
# The vLLM backend on one H100/H200 in under 8 minutes: builds a random Qwen2-shaped model of ~1.2B
# parameters (no download), runs trials through VLLMGrafted and prints per-trial merge and evaluation times
# and the merge's effective memory bandwidth, then two equality checks. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--trials N] [--enforce-eager] [--kernel compiled] ...
#
# Needs the GPU build of vLLM (pip install -e '.[vllm]') in .venv (or $PYTHON). Exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
# 470 s: the whole check stays under 8 minutes even if something hangs.
exec timeout 470 "$PYTHON" benchmarks/gpu_check.py "$@"
