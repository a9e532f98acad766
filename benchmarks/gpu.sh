#!/usr/bin/env bash
# Everything this project measures on a GPU, as two prepared calls of at most about six minutes
# each. Run from the repository root (a copy without .git is fine; the package is used from the
# checkout through PYTHONPATH, not installed):
#
#   CRCD_COMMIT=<hash> bash benchmarks/gpu.sh call1 OUT   # backend check, then the relation-core grid
#   CRCD_COMMIT=<hash> bash benchmarks/gpu.sh call2 OUT   # training-step table, then the AMP check
#   bash benchmarks/gpu.sh stage OUT NAME...              # single stages (names below)
#
# call1: check_backends.py (eager, compile, triton, chunked against float64 naive; forward loss and
#        backward gradients; core in fp32, CRCDLoss in fp32 / bf16 autocast / fp16 autocast +
#        GradScaler; exit 1 on a mismatch), then relation.py over B {64, 256} x K {500, 4096},
#        D 128: naive eager chunked triton, then compile alone (its compile cannot cost the others).
# call2: train_step.py, resnet32x4 -> resnet8x4, batch 64: CE, KD, the default KD + CRCD (bank,
#        backend auto = compile), the same with backend eager, and + gradient element; median ms,
#        peak MiB, x KD, and the 1.3x verdict. Then, while the call's budget lasts, amp_check.py
#        (fp16 + GradScaler and bf16 against fp32) and the KD + CRCD rows with backend triton.
#
# Every sub-step runs under `timeout` (cut to what is left of the call's budget, CALL_BUDGET_S,
# default 330 s) and writes its own file as it goes, so a hang or a failure keeps what came
# before. OUT gets at most 7 files per call, flat: CALL.log (everything printed) and the JSON/PNG
# of each sub-step. Exit status: 0 when every sub-step passed, else the last failing status.
#
# CRCD_COMMIT: the commit written into every output (else `git rev-parse`, else "unknown").
# GPU_SMOKE=1: tiny sizes on the CPU (device cpu, Triton under its interpreter in the check), to
#              test this script end to end on a machine without a GPU. PYTHON: the interpreter.
set -uo pipefail
mode="${1:-}"
out="${2:-}"
if [ -z "$mode" ] || [ -z "$out" ]; then
  echo "usage: bash benchmarks/gpu.sh call1|call2 OUT | bash benchmarks/gpu.sh stage OUT NAME..." >&2
  exit 2
fi
shift 2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
smoke="${GPU_SMOKE:-0}"
budget="${CALL_BUDGET_S:-330}"
if [ "$smoke" = 1 ]; then
  dev=cpu
  budget="${CALL_BUDGET_S:-1200}"
  pyflags=(-W error::DeprecationWarning)  # the smoke run proves the scripts use no deprecated spelling
else
  dev=cuda
  pyflags=()
fi
log="$out/$mode.log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!
status=0
summary=()

# run NAME CAP_SECONDS COMMAND...: under timeout (CAP, cut to the budget left); records the status.
run() {
  local name="$1" cap="$2"
  shift 2
  local left=$((budget - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "== $name: SKIPPED, ${left}s left of the ${budget}s budget"
    summary+=("$name: skipped (budget)")
    return 0
  fi
  echo "== $name ($(date -u +%H:%M:%S), at ${SECONDS}s, limit ${limit}s): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (TIMED OUT after ${limit}s)"
  echo "== $name: exit $rc$note, $((SECONDS - start))s"
  summary+=("$name: exit $rc$note, $((SECONDS - start))s")
  [ "$rc" -eq 0 ] || status=$rc
  return 0
}

# enough NAME ESTIMATE: whether about ESTIMATE seconds are left of the budget (else says so).
enough() {
  if [ $((SECONDS + $2)) -gt "$budget" ]; then
    echo "== $1: SKIPPED, needs about $2s, $((budget - SECONDS))s left of the ${budget}s budget"
    summary+=("$1: skipped (budget)")
    return 1
  fi
}

echo "== benchmarks/gpu.sh $mode $out (smoke=$smoke, device $dev, budget ${budget}s)"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "nvidia-smi: not found"
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda available', torch.cuda.is_available())" || status=1
"$PY" benchmarks/run_info.py || status=1
if [ "$dev" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "CUDA is not available: nothing to run (GPU_SMOKE=1 runs the tiny CPU version)"
  exit 1
fi

# Sizes: the issue's, or tiny ones for the CPU smoke run.
if [ "$smoke" = 1 ]; then
  check_args=(--smoke --compile-budget-s 45)
  grid=(--batch 8 --negatives 60 --dim 32 --chunk-size 16 --repeats 2)
  train=(--batch-size 8 --steps 2 --warmup 1 --rounds 1)
  train_backend=(--backend compile)  # what "auto" picks on CUDA; on the CPU it would stay eager
  amp=(--steps 3 --dtypes fp16 bf16)
  shared=(--batch 8 16 --negatives 60 --dim 32 --repeats 2)
  bank=(--batch 16 --negatives 8 --num-samples 200 --rounds 1 --steps 2)
  check_env=(env TRITON_INTERPRET=1)
else
  check_args=(--compile-budget-s 60)
  grid=(--batch 64 256 --negatives 500 4096 --dim 128 --chunk-size 256 --repeats 10)
  train=(--batch-size 64 --steps 20 --warmup 5 --rounds 3)
  train_backend=()  # "auto": compiled on CUDA
  amp=(--steps 30)
  shared=(--batch 32 64 256 --negatives 500 4096 --repeats 10)
  bank=(--negatives 500 4096 --num-samples 50000)
  check_env=(env)
fi
bank_rows=(ce kd crcd_bank crcd_bank_eager crcd_bank_gradient)

stage() {
  case "$1" in
    check) run check 180 "${check_env[@]}" "$PY" "${pyflags[@]}" benchmarks/check_backends.py --device "$dev" \
        "${check_args[@]}" --json "$out/check_backends_$dev.json" ;;
    relation) run relation 80 "$PY" "${pyflags[@]}" benchmarks/relation.py --device "$dev" "${grid[@]}" \
        --impl naive eager chunked triton --naive-max-gib 20 --out "$out" ;;
    relation_compile) run relation_compile 120 "$PY" "${pyflags[@]}" benchmarks/relation.py --device "$dev" \
        "${grid[@]}" --impl compile --baseline "$out/relation_$dev.json" --tag compile --out "$out" ;;
    train) run train 200 "$PY" "${pyflags[@]}" benchmarks/train_step.py --device "$dev" "${train[@]}" \
        "${train_backend[@]}" --configs "${bank_rows[@]}" --json "$out/train_step_$dev.json" ;;
    amp) run amp 200 "$PY" "${pyflags[@]}" benchmarks/amp_check.py --device "$dev" "${amp[@]}" \
        --json "$out/amp_check_$dev.json" ;;
    train_triton) run train_triton 90 "$PY" "${pyflags[@]}" benchmarks/train_step.py --device "$dev" \
        "${train[@]}" --backend triton --configs kd crcd_bank crcd_bank_gradient --json "$out/train_step_${dev}_triton.json" ;;
    train_nochecks) run train_nochecks 150 "$PY" "${pyflags[@]}" benchmarks/train_step.py --device "$dev" \
        "${train[@]}" --no-checks --configs kd crcd_bank crcd_bank_gradient --json "$out/train_step_${dev}_nochecks.json" ;;
    shared) run shared 200 "$PY" "${pyflags[@]}" benchmarks/relation.py --device "$dev" --layout queue "${shared[@]}" \
        --impl naive per-sample eager triton --naive-max-gib 20 --out "$out" ;;
    shared_bank) run shared_bank 120 "$PY" "${pyflags[@]}" benchmarks/shared_bank.py --device "$dev" "${bank[@]}" \
        --out "$out/shared_bank_$dev.json" ;;
    *) echo "unknown stage: $1" >&2; status=2 ;;
  esac
}

case "$mode" in
  call1)
    stage check
    stage relation
    stage relation_compile
    ;;
  call2)
    stage train
    if enough amp 60; then stage amp; fi
    if enough train_triton 75; then stage train_triton; fi  # no torch.compile there: Triton's JIT only
    ;;
  stage)
    [ $# -gt 0 ] || { echo "stage needs names: check relation relation_compile train amp train_triton" \
      "train_nochecks shared shared_bank" >&2; exit 2; }
    for name in "$@"; do stage "$name"; done
    ;;
  *) echo "unknown mode: $mode (call1, call2 or stage)" >&2; exit 2 ;;
esac

echo "== summary of $mode (${SECONDS}s in all):"
for line in "${summary[@]}"; do echo "   $line"; done
echo "== files in $out:"
ls -la "$out"
echo "== exit status $status"
exec 1>&- 2>&-
wait "$tee_pid" 2> /dev/null || sleep 1  # the log complete before the call returns
exit "$status"
