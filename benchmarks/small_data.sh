#!/bin/bash
# Few normal slices on real-CT-like geometry: the frequency_aware small preset (side 96) on
# `medad-fast phantom --few-slices --liver-scale 0.65` (24 normal training slices, small faint
# test lesions, 256 px slices whose liver box is about half the slice wide, as on 512 x 512 CT),
# with and without the three small-data features (--crop liver, --augment, --val-fraction),
# several seeds; prints a table of evaluate's image AUROC and pixel AP (computed on the whole
# slice at the model's side for every row, so the rows compare).
#
#   benchmarks/small_data.sh [OUT]        (default small-data-runs; SEEDS="0 1 2 3 4", CONFIGS=all rows by default)
#
# Rows: base (24 whole slices), crop (--crop liver: each slice cut to its liver box before the
# resize), aug (--augment), val (--val-fraction 0.25: 18 trained on, the best epoch by the
# synthetic validation score), augval (both), cropaug, cropval (crop with one of the two),
# all (crop + aug + val), base18
# (--max-train-images 18: what the held-back slices cost without any selection), cropema
# (crop + --ema 0.99: the averaged weights, the last epoch) and cropemaval (crop + --ema 0.99 +
# --val-fraction 0.25: the best epoch by the averaged weights' synthetic validation score). Finished runs
# are reused. One thread per run (OMP_NUM_THREADS=1); about a minute per run on an idle
# 2-core machine. (Before --liver-scale the data was `--few-slices` alone, whose liver fills
# most of the slice; its runs were in $OUT/runs, these are in $OUT/runs-liver.)
set -euo pipefail
OUT=${1:-small-data-runs}
SEEDS=${SEEDS:-"0 1 2 3 4"}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
DATA="$OUT/few-liver"
RUNS="$OUT/runs-liver"
CONFIGS=${CONFIGS:-"base crop aug val augval cropaug cropval all base18"}
mkdir -p "$RUNS"
[ -f "$DATA/manifest.json" ] || $PY -m medad_fast.cli phantom "$DATA" --few-slices --liver-scale 0.65 --no-progress
for seed in $SEEDS; do
  for cfg in $CONFIGS; do
    case $cfg in
      base) flags="--crop none";;
      crop) flags="--crop liver";;
      aug) flags="--crop none --augment";;
      val) flags="--crop none --val-fraction 0.25";;
      augval) flags="--crop none --augment --val-fraction 0.25";;
      cropaug) flags="--crop liver --augment";;
      cropval) flags="--crop liver --val-fraction 0.25";;
      all) flags="--crop liver --augment --val-fraction 0.25";;
      base18) flags="--crop none --max-train-images 18";;
      cropema) flags="--crop liver --ema 0.99";;
      cropemaval) flags="--crop liver --ema 0.99 --val-fraction 0.25";;
    esac
    run="$RUNS/$cfg-s$seed"
    [ -f "$run-eval-test/metrics.json" ] && continue
    # shellcheck disable=SC2086
    $PY -m medad_fast.cli train --data "$DATA" --preset small --seed "$seed" --out "$run" --no-progress \
      --device cpu $flags > "$run.train.log" 2>&1
    $PY -m medad_fast.cli evaluate "$run" --data "$DATA" --out "$run-eval-test" --no-progress --cases 0 --device cpu \
      > "$run.eval.log" 2>&1
  done
done
rows=()
for cfg in $CONFIGS; do
  rows+=(--row "$cfg")
  for seed in $SEEDS; do rows+=("$RUNS/$cfg-s$seed-eval-test/metrics.json"); done
done
$PY "$(dirname "$0")/spread_table.py" "${rows[@]}"
