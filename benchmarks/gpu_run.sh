#!/usr/bin/env bash
# Issue 8's measurements on a GPU machine, in at most 6 minutes ($HPCSEG_BENCH_LIMIT_S, default 355 s).
#
# Run from the repository root with $OUT set (results land there):
#   OUT=/some/dir bash benchmarks/gpu_run.sh
# Needs: python3 with a CUDA torch; monai and numpy (installed from benchmarks/wheels/ or $WHEELS when monai is
# missing); tomli on Python < 3.11; tensorboard (hpcseg train writes its events). Data: benchmarks/data/brain2d
# (copied from ../shared/data/brain2d and carried), else ../shared/data/brain2d, or $HPCSEG_BENCH_DATA.
#
# Steps, each under `timeout` (capped by the time left) and printing its result as soon as it has it; a failed
# step does not stop the next one. $OUT/steps.tsv gets one line per step (name, rc, seconds) and gpu_run.log a
# START line before each step: where the run stopped, if it was killed, is the last START without its END.
#   1. env: GPU, torch, CUDA, the precision train.precision="auto" picks on this card (~10 s)
#   2. throughput: exercise loop vs hpcseg at batch 2, 64, 128, 256, bounded by time (--time-budget-s 60)
#   3. e2e: the GPU default, `hpcseg train jobs/gpu.toml` (700 epochs, validation every 10, early stop as
#      shipped) then `hpcseg test` on the validation split (brain2d has no test split): wall time from process
#      start to the test summary, and each phase's share (train.json's phases_s)
#   4. dice_at_wall: validation Dice at 60 s and at the end of the time left (300 s when it is there) for the
#      exercise loop, the shipped batch-2 job and the GPU default, run CONCURRENTLY on the one GPU to fit the
#      6 minutes: each shares the card with the other two, so each figure is what it reached while sharing
# HPCSEG_BENCH_TINY=1 shrinks everything to a plumbing check that runs on a CPU in about 3 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
export OUT=$(cd "$OUT" && pwd)
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
PY=${PYTHON:-python3}
TINY=${HPCSEG_BENCH_TINY:-0}
LIMIT=${HPCSEG_BENCH_LIMIT_S:-$([[ "$TINY" == 1 ]] && echo 230 || echo 355)}
DATA=${HPCSEG_BENCH_DATA:-benchmarks/data/brain2d}
[[ -d "$DATA" || -n "${HPCSEG_BENCH_DATA:-}" ]] || DATA=../shared/data/brain2d
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$OUT/steps.tsv"
RESULTS="$OUT/RESULTS.md"
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/gpu_run.log"; }
hpcseg() { "$PY" -m hpcseg "$@"; }

env_step() {
  "$PY" - <<'EOF'
import json, os, platform, torch
from hpcseg.precision import choose_precision
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": len(os.sched_getaffinity(0))}
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
info["precision_auto"] = choose_precision("auto", device)
for mod in ("monai", "numpy", "torch.utils.tensorboard", "hpcseg"):
    try:
        m = __import__(mod, fromlist=["_"])
        info[mod] = getattr(m, "__version__", "ok")
    except Exception as err:  # noqa: BLE001
        info[mod] = f"missing ({type(err).__name__})"
print(json.dumps(info, indent=1))
open(os.path.join(os.environ["OUT"], "env.json"), "w").write(json.dumps(info, indent=1) + "\n")
EOF
}

# the GPU default through the real command line, each process timed from its start
e2e_step() {
  local run="$OUT/e2e/run" test_out="$OUT/e2e/test" t0 t1 t2
  rm -rf "$OUT/e2e" && mkdir -p "$OUT/e2e"
  t0=$(date +%s%N)
  hpcseg train jobs/gpu.toml --data "$DATA" --out "$run" "${E2E_SETS[@]}" || return $?
  t1=$(date +%s%N)
  hpcseg test "$run" --data "$DATA/validation_data" --out "$test_out" > "$OUT/e2e/test.txt" || return $?
  t2=$(date +%s%N)
  tail -n 8 "$OUT/e2e/test.txt"
  "$PY" benchmarks/gpu_report.py e2e "$run" "$test_out" "$(( (t1 - t0) / 1000000 ))e-3" "$(( (t2 - t1) / 1000000 ))e-3" \
    --results "$RESULTS" --note "$E2E_NOTE"
}

# three loops at once on the one GPU, each validated when its wall clock passes each point
ttd_step() {
  local left=$((${HPCSEG_STEP_LIMIT_S:-$TTD_MAX} - 25)) last pids=() rc=0
  last=$(( left < TTD_MAX ? left : TTD_MAX ))
  (( last > TTD_FIRST )) || last=$((TTD_FIRST + 5))
  local points="$TTD_FIRST,$last"
  echo "points: $points s of wall time per loop, the three loops at once"
  "$PY" benchmarks/dice_at_wall.py --loop ex --points "$points" --data "$DATA" "${TTD_EX[@]}" \
    --json "$OUT/ttd_ex.json" & pids+=($!)
  "$PY" benchmarks/dice_at_wall.py --loop hpcseg --job jobs/exercise-improved.toml --name shipped-b2 \
    --points "$points" --data "$DATA" "${TTD_HP[@]}" --json "$OUT/ttd_b2.json" & pids+=($!)
  "$PY" benchmarks/dice_at_wall.py --loop hpcseg --job jobs/gpu.toml --name gpu-default \
    --points "$points" --data "$DATA" "${TTD_HP[@]}" --json "$OUT/ttd_gpu.json" & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  "$PY" benchmarks/gpu_report.py ttd "$OUT/ttd_ex.json" "$OUT/ttd_b2.json" "$OUT/ttd_gpu.json" --results "$RESULTS" \
    --note "the three loops ran at the same time on one GPU (sharing it), points $points s of wall time since each process started"
  return $rc
}

if [[ "$TINY" == 1 ]]; then
  # a few slices of each split, so that the CPU checks the plumbing, not the speed
  TINY_DATA="$OUT/tiny-data"
  if [[ "${1:-}" != --step ]]; then
    rm -rf "$TINY_DATA"
    for split in training_data:12 validation_data:6; do
      mkdir -p "$TINY_DATA/${split%%:*}"
      for image in $(ls "$DATA/${split%%:*}"/*_T1w.npy | head -n "${split##*:}"); do
        cp "$image" "${image%.npy}_tissue_segmentation.npy" "$TINY_DATA/${split%%:*}/"
      done
    done
  fi
  DATA=$TINY_DATA
  TP=(--variants ex,b2 --rounds 1 --time-budget-s 30 --warmup-s 0.1 --crop 64)
  E2E_SETS=(--set train.epochs=2 --set train.val_interval=1 --set 'model.features=[8,8,16,16,32,8]'
            --set train.batch_size=8 --set 'train.crop=[64,64]')
  E2E_NOTE="tiny mode: 2 epochs of a small U-Net (plumbing check)"
  TTD_FIRST=25 TTD_MAX=40
  TTD_EX=(--crop 64)
  TTD_HP=(--set 'model.features=[8,8,16,16,32,8]' --set 'train.crop=[64,64]')
else
  TP=(--variants ex,b2,b64,b128,b256 --rounds 2 --time-budget-s 60 --warmup-s 1)
  E2E_SETS=()
  E2E_NOTE="jobs/gpu.toml as shipped"
  TTD_FIRST=60 TTD_MAX=300
  TTD_EX=()
  TTD_HP=()
fi

# one step of the above in a process of its own (run_step's timeout ends it and all it started)
if [[ "${1:-}" == --step ]]; then
  "$2"
  exit $?
fi

: > "$STATUS"
CURRENT=""

# a kill (timeout, Ctrl-C, the machine's limit) says where it stopped; a SIGKILL leaves START without END
trap 'log "STOPPED by a signal in step ${CURRENT:-none} at +${SECONDS}s; finished steps: $(cut -f1 "$STATUS" | tr "\n" " ")"; exit 143' TERM INT

# run_step NAME PLANNED_SECONDS CMD...: run CMD under timeout (capped by the time left), output to $OUT/NAME.log
run_step() {
  local name=$1 planned=$2; shift 2
  local left=$((LIMIT - SECONDS - 5))
  local limit=$(( planned < left ? planned : left ))
  if (( limit < 15 )); then
    log "SKIP $name: ${left}s left"
    printf '%s\tskipped\t0\n' "$name" >> "$STATUS"
    return 0
  fi
  CURRENT=$name
  log "START $name (timeout ${limit}s): $*"
  local rc=0 started=$SECONDS
  HPCSEG_STEP_LIMIT_S=$limit timeout --kill-after=5 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || rc=$?
  wait || true  # let tee finish writing
  log "END $name rc=$rc in $((SECONDS - started))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$STATUS"
  CURRENT=""
  return 0
}

log "gpu_run.sh on $(hostname); tiny=$TINY limit=${LIMIT}s data=$DATA"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" || log "no nvidia-smi"

if ! "$PY" -c "import monai, numpy" 2>/dev/null; then
  WHEELS=${WHEELS:-benchmarks/wheels}
  log "monai/numpy missing: installing from $WHEELS"
  extra=()
  "$PY" -c "import sys; sys.exit(sys.version_info < (3, 11))" || extra+=(tomli)
  timeout 90 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" monai numpy tensorboard "${extra[@]}" 2>&1 \
    | tee "$OUT/pip.log" || log "pip install failed (see pip.log)"
fi

run_step env 30 bash "$SELF" --step env_step
run_step throughput 75 "$PY" benchmarks/train_throughput.py --data "$DATA" "${TP[@]}" \
  --json "$OUT/train_throughput.json" --results "$RESULTS"
run_step e2e 150 bash "$SELF" --step e2e_step
run_step dice_at_wall 320 bash "$SELF" --step ttd_step

log "steps (name, rc, seconds):"
tee -a "$OUT/gpu_run.log" < "$STATUS"
! grep -qvE $'\t(0|skipped)\t' "$STATUS"
