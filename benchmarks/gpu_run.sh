#!/usr/bin/env bash
# Issue 4's benchmarks on a lent GPU machine, in one go of at most ~9 minutes.
#
# Run from the repository root with $OUT set (results land there):
#   OUT=/some/dir bash benchmarks/gpu_run.sh
# Needs: python3 with a CUDA torch; monai==1.6.1 and numpy (installed from benchmarks/wheels/ or $WHEELS when
# monai is missing); tomli on Python < 3.11; matplotlib optional (plot), tensorboard optional (then the
# time-to-Dice steps run hpcseg.train.train() itself, else the same loop without checkpoints/TensorBoard).
# Data: benchmarks/data/brain2d (copied from ../shared/data/brain2d and carried), or $HPCSEG_BENCH_DATA.
#
# Steps, each under `timeout` and skipped when the time left ($HPCSEG_BENCH_LIMIT_S, default 510 s) is short;
# a failed step does not stop the next one:
#   1. environment: GPU name, torch, installs
#   2. step_profile: each phase's time and operator count of hpcseg's step at batch 2, 16, 64, top kernels
#   3. train_throughput: exercise loop (batch 2) vs hpcseg b2 (bf16), b2 and b64 with the CPU's dropout mask
#      (-maskdrop), b2 with CUDA graphs (compile reduce-overhead), b64, b128, b128 compiled, b256, alternating
#   4. same epochs: exercise loop vs hpcseg b2 and hpcseg b16 (sqrt lr rule), 20 epochs each, validation Dice
#   5. time to Dice: exercise 1.5 min vs hpcseg b16 0.5 min of training (skipped when time is short)
# HPCSEG_BENCH_TINY=1 shrinks everything to a plumbing check that also runs on a CPU.
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TINY=${HPCSEG_BENCH_TINY:-0}
LIMIT=${HPCSEG_BENCH_LIMIT_S:-510}
DATA=${HPCSEG_BENCH_DATA:-benchmarks/data/brain2d}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$OUT/steps.tsv"
: > "$STATUS"

log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/gpu_run.log"; }

# run_step NAME PLANNED_SECONDS CMD...: run CMD under timeout (capped by the time left), output to $OUT/NAME.log
run_step() {
  local name=$1 planned=$2; shift 2
  local left=$((LIMIT - SECONDS - 10))
  local limit=$(( planned < left ? planned : left ))
  if (( limit < 30 )); then
    log "SKIP $name: ${left}s left"
    printf '%s\tskipped\t0\n' "$name" >> "$STATUS"
    return 0
  fi
  log "START $name (timeout ${limit}s): $*"
  local rc=0 started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || rc=$?
  wait || true  # let tee finish writing
  log "END $name rc=$rc in $((SECONDS - started))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$STATUS"
}

log "gpu_run.sh on $(hostname); tiny=$TINY limit=${LIMIT}s data=$DATA"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" || log "no nvidia-smi"

if ! "$PY" -c "import monai, numpy" 2>/dev/null; then
  WHEELS=${WHEELS:-benchmarks/wheels}
  log "monai/numpy missing: installing from $WHEELS"
  extra=()
  "$PY" -c "import sys; sys.exit(sys.version_info < (3, 11))" || extra+=(tomli)
  timeout 120 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" monai numpy "${extra[@]}" 2>&1 \
    | tee "$OUT/pip.log" || log "pip install failed (see pip.log)"
  for opt in matplotlib tensorboard; do  # optional: plot / train() itself; only if their wheels were carried
    timeout 120 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$opt" > /dev/null 2>&1 || log "optional $opt not installed"
  done
fi

run_step env 60 "$PY" - <<'EOF'
import json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": len(os.sched_getaffinity(0))}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
for mod in ("monai", "numpy", "matplotlib", "torch.utils.tensorboard", "hpcseg"):
    try:
        m = __import__(mod, fromlist=["_"])
        info[mod] = getattr(m, "__version__", "ok")
    except Exception as err:  # noqa: BLE001
        info[mod] = f"missing ({type(err).__name__})"
print(json.dumps(info, indent=1))
open(os.path.join(os.environ["OUT"], "env.json"), "w").write(json.dumps(info, indent=1) + "\n")
EOF

if [[ "$TINY" == 1 ]]; then
  SP=(--batches 2 --steps 1)
  TP=(--samples 4 --rounds 1 --warmup-samples 2 --variants ex,b2,b4)
  SAME=(--epochs 1 --minutes 0.05 --hpcseg-minutes 0.05 --ex-val-interval 1 --hpcseg b2:train.batch_size=2 --hpcseg b4:train.batch_size=4)
  TTD=(--minutes 0.1 --hpcseg-minutes 0.05 --ex-val-interval 1 --hpcseg b4:train.batch_size=4)
else
  SP=(--batches 2,16,64 --steps 20 --kernels 15)
  TP=(--samples 512 --rounds 3 --warmup-samples 256 --variants ex,b2,b2-maskdrop,b2-ro,b64,b64-maskdrop,b128,b128-co,b256)
  SAME=(--epochs 20 --minutes 4 --hpcseg-minutes 4 --ex-val-interval 5
        --hpcseg b2:train.batch_size=2 --hpcseg b16:train.batch_size=16)
  TTD=(--minutes 1.5 --hpcseg-minutes 0.5 --ex-val-interval 5 --hpcseg b16:train.batch_size=16)
fi

run_step step_profile 60 "$PY" benchmarks/step_profile.py --data "$DATA" "${SP[@]}" \
  --json "$OUT/step_profile.json" --results "$OUT/RESULTS.md"
run_step train_throughput 240 "$PY" benchmarks/train_throughput.py --data "$DATA" "${TP[@]}" \
  --json "$OUT/train_throughput.json" --results "$OUT/RESULTS.md"
run_step same_epochs 150 "$PY" benchmarks/time_to_dice.py --data "$DATA" "${SAME[@]}" \
  --out "$OUT/same_epochs" --results "$OUT/RESULTS.md"
run_step time_to_dice 120 "$PY" benchmarks/time_to_dice.py --data "$DATA" "${TTD[@]}" \
  --out "$OUT/time_to_dice" --results "$OUT/RESULTS.md"

log "steps (name, rc, seconds):"
tee -a "$OUT/gpu_run.log" < "$STATUS"
! grep -qvE $'\t(0|skipped)\t' "$STATUS"
