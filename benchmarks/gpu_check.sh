#!/usr/bin/env bash
# The GPU check of benchmarks/README.md ("GPU options and gpu_check.sh"): the joint step at the reference shapes
# (configs/pretrain/joint_swav.yaml's per-GPU batch) with configs/trainer/gpu.yaml's settings (bf16-mixed,
# SyncBatchNorm, DDP on a 1-GPU process group), eager and compiled, on one GPU. Prints one RESULT line per
# variant (images/s, peak memory, MFU) as soon as it is measured, then a SUMMARY line. Under 5 minutes on an H100;
# the 290 s limit keeps it so (the lines already printed stand if the compiled variant runs out of time).
#   bash benchmarks/gpu_check.sh                       # first GPU (CUDA_VISIBLE_DEVICES picks another)
#   bash benchmarks/gpu_check.sh --peak-tflops 989     # a GPU missing from the peak table
#   bash benchmarks/gpu_check.sh --dry-run             # CPU, tiny shapes: the same code in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"   # one GPU
exec timeout --signal=INT --kill-after=10 "${GPU_CHECK_TIMEOUT:-290}" "$PYTHON" benchmarks/gpu_check.py "$@"
