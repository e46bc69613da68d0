#!/usr/bin/env bash
# `make demo`: the whole method on the embedded phantom data, on a CPU in minutes.
#
#   1. medad-fast phantom   procedural liver-CT slices with lesions (BMAD layout)
#   2. medad-fast train     the small preset at 80 x 80 on the liver box, 60 epochs (under 10 min
#                           on a 2-core CPU: docs/results.md, "Shorter demos tried")
#   3. medad-fast evaluate  metrics.json, ROC plot and heatmaps of the worst/best cases
#
# Everything goes to demo_out/ (DEMO_OUT overrides); a re-run starts a fresh training run.
# Extra arguments are passed to `medad-fast train` after DEMO_TRAIN_ARGS (e.g. --device cuda,
# --epochs 5); DEMO_TRAIN_ARGS="--crop none" trains the plain small preset on whole slices
# (DEMO_TRAIN_ARGS="": the small preset with --crop auto, which crops the phantom's liver-masked slices).
#
# The demo runs with the CPU kernels pinned to AVX2 (`--reproducible`: medad_fast/cpu_isa.py),
# so it prints the same figures on AVX2 and AVX-512 machines; MEDAD_FAST_REPRODUCIBLE=0 runs
# it on the machine's best kernels (faster on AVX-512, other figures).
set -euo pipefail
export MEDAD_FAST_REPRODUCIBLE="${MEDAD_FAST_REPRODUCIBLE:-1}"

OUT="${DEMO_OUT:-demo_out}"
DEMO_TRAIN="${DEMO_TRAIN:-200}"   # normal training slices
DEMO_TEST="${DEMO_TEST:-100}"     # test slices, half of them with lesions

if command -v medad-fast >/dev/null 2>&1; then
  MEDAD=(medad-fast)
else
  MEDAD=(python -m medad_fast.cli)
fi

start=$(date +%s)
echo "== 1/3 phantom data -> $OUT/data"
"${MEDAD[@]}" phantom "$OUT/data" --train "$DEMO_TRAIN" --test "$DEMO_TEST" --seed 0 --no-progress

# the small preset (96 x 96, 70 epochs) trains for about 14 min on 2 cores; cropped to the
# liver box at 80 x 80 for 60 epochs it takes about 9 (figures: README, "What the demo reaches")
DEMO_TRAIN_ARGS="${DEMO_TRAIN_ARGS---image-size 80 --crop liver --epochs 60}"

echo "== 2/3 training (small preset, $DEMO_TRAIN_ARGS) -> $OUT/run"
rm -rf "$OUT/run"
# shellcheck disable=SC2086  # DEMO_TRAIN_ARGS is a list of options
"${MEDAD[@]}" train --data "$OUT/data" --preset small $DEMO_TRAIN_ARGS --out "$OUT/run" "$@"

echo "== 3/3 evaluation -> $OUT/eval"
"${MEDAD[@]}" evaluate "$OUT/run" --data "$OUT/data" --split test --out "$OUT/eval"

elapsed=$(( $(date +%s) - start ))
echo "demo finished in $((elapsed / 60)) min $((elapsed % 60)) s; results in $OUT/eval"
