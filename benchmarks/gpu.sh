#!/usr/bin/env bash
# Everything this project measures on a GPU, as one prepared run. Run from the repository root:
#
#     bash benchmarks/gpu.sh [out-dir] [stage ...]      # default: benchmarks/results, all stages
#
# Stages, in order (rough H100 times, not yet measured: a device session should pick what fits):
#   check          every backend against float64 naive on CUDA; exit 1 on a mismatch (1-2 min)
#   relation       relation-loss grid B x K, naive/eager/compile/chunked/triton (3-5 min)
#   shared         shared candidates (in-batch, queue K in {500, 4096}), B in {32, 64, 256}:
#                  naive/per-sample/eager/triton (about 1 min; compile left out: each shape family
#                  compiles anew, and that would double the stage)
#   shared_bank    CRCDLoss with a bank, per-sample vs shared draws (share_negatives), K 500/4096 (<1 min)
#   train          training step CE / KD / CRCD feature / feature+gradient, backend auto (3-4 min)
#   train_triton   KD and feature+gradient with backend="triton" (1-2 min)
#   train_nochecks KD and feature+gradient without CRCDLoss's input checks (no host sync) (1-2 min)
#   amp            fp16 + GradScaler and bf16 autocast vs fp32, default and reference presets (<1 min)
#
# Needs torch with CUDA, triton, einops and matplotlib; uses the checkout without installing it.
set -euo pipefail
out="${1:-benchmarks/results}"
shift || true
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(check relation shared shared_bank train train_triton train_nochecks amp)
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_cuda.txt"
for stage in "${stages[@]}"; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  case "$stage" in
    check) python benchmarks/check_backends.py --device cuda | tee "$out/check_backends_cuda.txt" ;;
    relation) python benchmarks/relation.py --device cuda --full --impl naive eager compile chunked triton --out "$out" ;;
    shared)
      python benchmarks/relation.py --device cuda --layout batch --batch 32 64 256 \
        --impl naive per-sample eager triton --out "$out"
      python benchmarks/relation.py --device cuda --layout queue --batch 32 64 256 --negatives 500 4096 \
        --impl naive per-sample eager triton --out "$out" ;;
    shared_bank) python benchmarks/shared_bank.py --device cuda --negatives 500 4096 --num-samples 50000 \
        --out "$out/shared_bank_cuda.json" ;;
    train) python benchmarks/train_step.py --device cuda --json "$out/train_step_cuda.json" ;;
    train_triton) python benchmarks/train_step.py --device cuda --backend triton --configs kd crcd_feature_gradient \
        --json "$out/train_step_cuda_triton.json" ;;
    train_nochecks) python benchmarks/train_step.py --device cuda --no-checks --configs kd crcd_feature_gradient \
        --json "$out/train_step_cuda_nochecks.json" ;;
    amp) python benchmarks/amp_check.py --device cuda | tee "$out/amp_check_cuda.txt" ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
done
