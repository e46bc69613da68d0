#!/bin/bash
# How much a trained model depends on its seed, and what steadies it: the paper's method
# (frequency_aware) and ae at the `small` preset on `medad-fast phantom --few-slices` data
# (24 normal training slices, small faint test lesions), SEEDS seeds each, trained plain and
# with `--ema DECAY`; then 3-seed ensembles of the plain runs and of the EMA runs
# (`evaluate --ensemble`). ENSEMBLES=cyclic (the default) makes one ensemble per seed, of seeds
# i, i+1, i+2 cyclically: as many ensembles as seeds, but they share members, which understates
# their sd; ENSEMBLES=disjoint groups the seeds in threes in order (0-2, 3-5, ...; a short last
# group is left out), so no two ensembles share a run: use 15 seeds for 5 ensembles. Prints, per
# row, the mean and sample sd over the seeds (or ensembles) of evaluate's image AUROC, pixel AP
# and pixel AUROC (benchmarks/spread_table.py). For the spread of k-seed ensembles drawn from
# many seeds' runs (every k-subset of a pool), run benchmarks/ensemble_spread.py on OUT/runs.
#
#   benchmarks/seed_spread.sh [OUT]   (default seed-spread-runs; SEEDS="0 1 2 3 4", EMA=0.99,
#                                      METHODS="frequency_aware ae", CROP=auto|liver|none,
#                                      DATA=a phantom folder to use instead,
#                                      VARIANTS="plain ema" (one lane of a split run),
#                                      ENSEMBLES=cyclic|disjoint,
#                                      TRAIN_ARGS=more train options, e.g. the demo's
#                                      "--image-size 80 --epochs 60")
#
# Finished runs and evaluations are reused, interrupted runs resumed (a run keeps the --crop it
# was trained with: use another OUT for another CROP). One thread per run (OMP_NUM_THREADS=1),
# default options otherwise (CROP: --crop, default auto, which crops the phantom's liver-masked
# slices). The decay 0.99 averages about the last 100 steps: the few-slices runs take 3 steps
# per epoch (24 slices, batch 8), 210 in all.
set -euo pipefail
OUT=${1:-seed-spread-runs}
SEEDS=${SEEDS:-"0 1 2 3 4"}
EMA=${EMA:-0.99}
METHODS=${METHODS:-"frequency_aware ae"}
CROP=${CROP:-auto}
TRAIN_ARGS=${TRAIN_ARGS:-}
VARIANTS=${VARIANTS:-"plain ema"}
ENSEMBLES=${ENSEMBLES:-cyclic}
case $ENSEMBLES in cyclic|disjoint) ;; *) echo "ENSEMBLES must be cyclic or disjoint, not '$ENSEMBLES'" >&2; exit 2;; esac
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
DATA=${DATA:-"$OUT/few"}
RUNS="$OUT/runs"
# the ensembles' folder suffix: the cyclic ones keep the name earlier tables were made with
if [ "$ENSEMBLES" = cyclic ]; then ensemble=ensemble3; else ensemble=disjoint3; fi
mkdir -p "$RUNS"
[ -f "$DATA/manifest.json" ] || $PY -m medad_fast.cli phantom "$DATA" --few-slices --no-progress
evaluate() {  # evaluate OUT_DIR MODEL...
  local where=$1; shift
  [ -f "$where/metrics.json" ] && return 0
  $PY -m medad_fast.cli evaluate "$@" --data "$DATA" --out "$where" --no-progress --cases 0 --device cpu \
    > "$where.log" 2>&1
}
for method in $METHODS; do
  for seed in $SEEDS; do
    for variant in $VARIANTS; do
      run="$RUNS/$method-$variant-s$seed"
      flags="--crop $CROP $TRAIN_ARGS"
      [ "$variant" = ema ] && flags="$flags --ema $EMA"
      if [ ! -f "$run/eval-test/metrics.json" ]; then
        # an interrupted run (its checkpoints, no evaluation) continues where it stopped
        [ -f "$run/checkpoint.pt" ] && flags="$flags --resume"
        # shellcheck disable=SC2086
        $PY -m medad_fast.cli train --method "$method" --data "$DATA" --preset small --seed "$seed" --out "$run" \
          --no-progress --device cpu $flags >> "$run.train.log" 2>&1
      fi
      evaluate "$run/eval-test" "$run"
    done
  done
  # 3-seed ensembles of the plain and of the EMA runs, named after their first seed:
  # cyclic: seeds i, i+1, i+2 (mod n); disjoint: seeds 3k, 3k+1, 3k+2
  set -- $SEEDS
  n=$#
  seeds=("$@")
  if [ "$ENSEMBLES" = cyclic ]; then starts=$(seq 0 $((n - 1))); else starts=$(seq 0 3 $((n - 3))); fi
  for variant in $VARIANTS; do
    for i in $starts; do
      members=()
      for ((j = 0; j < 3 && j < n; j++)); do
        members+=("$RUNS/$method-$variant-s${seeds[$(((i + j) % n))]}")
      done
      evaluate "$RUNS/$method-$variant-$ensemble-s${seeds[$i]}" --ensemble "${members[@]}"
    done
  done
done
rows=()
for method in $METHODS; do
  for variant in plain ema "plain-$ensemble" "ema-$ensemble"; do
    rows+=(--row "$method $variant")
    for seed in $SEEDS; do
      case $variant in
        *-"$ensemble") rows+=("$RUNS/$method-$variant-s$seed/metrics.json");;
        *) rows+=("$RUNS/$method-$variant-s$seed/eval-test/metrics.json");;
      esac
    done
  done
done
$PY "$(dirname "$0")/spread_table.py" "${rows[@]}"
