#!/usr/bin/env bash
# The GPU table in under 10 minutes on one GPU (step limits add up to 9.8 min): model steps, scaling (demo and paper sizes),
# the overhead of one fit per stage at paper size, the demo protocol.
#
#   bash benchmarks/gpu.sh            # from the repository root, with the project's venv active or in .venv
#
# Everything goes to benchmarks/results/gpu_*.json and benchmarks/results/gpu.log; each step has its own time
# limit, so one slow or failing step does not stop the others. Training runs as a real run does on a GPU:
# bf16-mixed autocast, TF32 matmuls, SDPA attention, channels_last_3d teacher, pinned memory, non-blocking copies.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=benchmarks/results
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1  # TF32 in bench_models' plain fp32 steps too
status=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  if timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; then
    echo "=== $name done in $((SECONDS - t0)) s" | tee -a "$LOG"
  else
    echo "=== $name FAILED or timed out after $((SECONDS - t0)) s" | tee -a "$LOG"
    status=1
  fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  lscpu | grep -m1 'Model name' || true; } | tee "$OUT/gpu_machine.txt" | tee -a "$LOG"

# 1. Training-step throughput and fraction of the matmul peak, demo and paper-lite sizes (about 2 min).
step models 130 "$PY" -m benchmarks.bench_models --device cuda --threads 4 --paper-batch 4 --out "$OUT/gpu_models.json"
# 2. Epoch time and memory as the cases grow, demo size (about 1 min) and paper size (ViT-B, 96^3; about 2 min).
step scaling_demo 70 "$PY" -m benchmarks.bench_scaling --device cuda --quick --out "$OUT/gpu_scaling_demo.json"
step scaling_paper 120 "$PY" -m benchmarks.bench_scaling --device cuda --preset paper --n 16 --epochs 2 \
  --repeats 1 --out "$OUT/gpu_scaling_paper.json"
# 3. One fit per stage at paper size with the preset's batch sizes, workers and checkpoint interval: overhead and
#    data time / step time (about 1 min).
step overhead_paper 100 "$PY" -m benchmarks.bench_overhead --device cuda --preset paper --threads 4 \
  --out "$OUT/gpu_overhead_paper.json"
# 4. The whole demo protocol on the GPU (teacher, MAE, 5 methods x 5 folds, final model): stage table and overhead.
step demo 170 "$PY" benchmarks/bench_demo.py --set trainer.accelerator=gpu --set trainer.precision=bf16-mixed \
  --set trainer.threads=4 --json "$OUT/gpu_demo.json"

echo "results in $OUT/gpu_*.json, log in $LOG" | tee -a "$LOG"
exit $status
