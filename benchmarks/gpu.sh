#!/usr/bin/env bash
# Everything this project measures on a GPU, as one prepared run (about 10 minutes on an H100):
# first every backend's correctness on CUDA (Triton has only run under its CPU interpreter before),
# then the relation-loss grid and the training step. Run from the repository root:
#
#     bash benchmarks/gpu.sh [out-dir]          # default: benchmarks/results
#
# Needs torch with CUDA, triton, einops and matplotlib; uses the checkout without installing it.
set -euo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_cuda.txt"
python benchmarks/check_backends.py --device cuda | tee "$out/check_backends_cuda.txt"
python benchmarks/relation.py --device cuda --full --impl naive eager compile chunked triton --out "$out"
python benchmarks/train_step.py --device cuda --json "$out/train_step_cuda.json"
python benchmarks/train_step.py --device cuda --backend triton --configs kd crcd_feature_gradient \
    --json "$out/train_step_cuda_triton.json"
