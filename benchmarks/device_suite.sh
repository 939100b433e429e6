#!/usr/bin/env bash
# One call: the CUDA tests and every benchmark on one device, results under OUT_DIR.
#
#   benchmarks/device_suite.sh OUT_DIR [cuda|cpu] [full|quick]
#   PYTHON=.venv/bin/python benchmarks/device_suite.sh /tmp/suite cpu quick   # exercise it on a CPU
#
# Writes OUT_DIR/results.md (every step's command, exit code, wall time and output, headed by
# the hardware) plus OUT_DIR/<step>.log and OUT_DIR/hardware.json. Only what a step printed is
# in the file: a step that failed or timed out says so and gives no figure. The full-preset
# job's 80-epoch wall time is EXTRAPOLATED from two short runs and labelled so.
# "quick" shrinks every size so that the whole suite runs in minutes on a CPU (a check of the
# script, not a measurement to quote).
set -u
OUT=${1:?usage: benchmarks/device_suite.sh OUT_DIR [cuda|cpu] [full|quick]}
DEVICE=${2:-cuda}
SCALE=${3:-full}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES="$OUT/results.md"

if [ "$SCALE" = quick ]; then
  CASES="64x64:2 96x64:5"; SPEED="--repeats 1 --threads 1"; SCALING="--sizes 64 128 --no-extra --repeats 1"
  STEP="--size 32 --batch 2 --repeats 1"; POINTREND="--sizes 32 --backbones unet --warmup 1 --repeats 1"
  JOB="preset=smoke data.image_size=32 data.num_train=16 data.num_val=4 data.num_test=4 data.batch_size=4"
  EPOCHS_A=1; EPOCHS_B=2; LIMIT=120
else
  # 1024x2048x19 is in crf_scaling (its pydensecrf time is a CPU figure: measure it on the CPU)
  CASES="320x320:2 500x375:21"; SPEED="--repeats 5"; SCALING="--repeats 2 --no-pydensecrf"
  STEP="--size 320 --batch 8 --repeats 7"; POINTREND="--sizes 320 --batch 8"
  JOB="preset=full"; EPOCHS_A=2; EPOCHS_B=4; LIMIT=400
fi
if [ "$DEVICE" = cpu ]; then JOB="$JOB trainer.accelerator=cpu trainer.precision=32"; fi

{
  echo "# segrefine device suite ($DEVICE, $SCALE), $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  "$PY" -c "import json, sys; from segrefine import hardware; d = hardware.describe(sys.argv[1]); json.dump(d, open(sys.argv[2], 'w'), indent=1); print('Hardware:', hardware.summary(sys.argv[1]))" "$DEVICE" "$OUT/hardware.json"
  echo
} > "$RES" 2>&1

# step NAME TIMEOUT_S CMD...: run, log, and append to results.md with its exit code and time
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  {
    echo "## $name"
    echo
    echo "\`$*\` — exit $rc$([ $rc = 124 ] && echo ' (TIMED OUT: partial output, no figure to quote)'), $((SECONDS - start)) s wall"
    echo
    grep -v -E "^(USDT|ERROR:.*DeviceProperties|W[0-9]{4} )" "$OUT/$name.log" | tail -n 60
    echo
  } >> "$RES"
  return 0
}

step cuda_tests 300 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests
step crf_speed "$LIMIT" "$PY" benchmarks/crf_speed.py --device "$DEVICE" --cases $CASES $SPEED
step crf_scaling "$LIMIT" "$PY" benchmarks/crf_scaling.py --device "$DEVICE" $SCALING
step crfrnn_step "$LIMIT" "$PY" benchmarks/crfrnn_step.py --device "$DEVICE" $STEP
step pointrend_speed "$LIMIT" "$PY" benchmarks/pointrend_speed.py --device "$DEVICE" $POINTREND

# A full-preset job (U-Net, none and crfrnn heads): wall time of two short runs, then the
# preset's epoch count extrapolated linearly (fixed cost + per-epoch cost).
for head in none crfrnn; do
  for e in $EPOCHS_A $EPOCHS_B; do
    step "job_${head}_e$e" "$LIMIT" "$PY" -m segrefine.train experiment=paper_table $JOB backbone=unet head=$head \
      trainer.max_epochs=$e logger=csv force=true hydra.run.dir="$OUT/job_${head}_e$e"
  done
done
"$PY" - "$OUT" "$EPOCHS_A" "$EPOCHS_B" "$JOB" >> "$RES" 2>&1 <<'PYEOF'
import re, sys
from pathlib import Path

out, ea, eb, job = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
text = (out / "results.md").read_text()
preset = "full" if "preset=full" in job else "smoke"
conf = Path("conf/preset") / f"{preset}.yaml"
epochs = int(re.search(r"max_epochs:\s*(\d+)", conf.read_text()).group(1))
print("## full-preset job wall time (EXTRAPOLATED)\n")
for head in ("none", "crfrnn"):
    secs = {}
    for e in (ea, eb):
        m = re.search(rf"## job_{head}_e{e}\n\n`.*` — exit (\d+)[^,]*, (\d+) s wall", text)
        if m and m.group(1) == "0":
            secs[e] = int(m.group(2))
    if len(secs) < 2:
        print(f"- {head}: not extrapolated (a short run failed; see its log)")
        continue
    per_epoch = (secs[eb] - secs[ea]) / (eb - ea)
    if per_epoch <= 0:
        print(f"- {head}: not extrapolated ({eb} epochs took no longer than {ea}: start-up noise dominates)")
        continue
    total = secs[ea] + per_epoch * (epochs - ea)
    print(f"- U-Net + {head}, preset={preset}: measured {secs[ea]} s ({ea} epochs) and {secs[eb]} s ({eb} epochs) "
          f"incl. start-up and test; EXTRAPOLATED to the preset's {epochs} epochs: {total / 60:.1f} min "
          f"({per_epoch:.1f} s/epoch)")
PYEOF
echo "results: $RES"
