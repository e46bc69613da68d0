#!/bin/bash
# How much a trained model depends on its seed, and what steadies it: the paper's method
# (frequency_aware) and ae at the `small` preset on `medad-fast phantom --few-slices` data
# (24 normal training slices, small faint test lesions), SEEDS seeds each, trained plain and
# with `--ema DECAY`; then 3-seed ensembles of the plain runs (`evaluate --ensemble`, seeds
# i, i+1, i+2 cyclically, one ensemble per seed). Prints, per row, the mean and sample sd over
# the seeds (or ensembles) of evaluate's image AUROC and pixel AP.
#
#   benchmarks/seed_spread.sh [OUT]   (default seed-spread-runs; SEEDS="0 1 2 3 4", EMA=0.99,
#                                      METHODS="frequency_aware ae", DATA=a phantom folder to use instead)
#
# Finished runs and evaluations are reused. One thread per run (OMP_NUM_THREADS=1), default
# options otherwise (no --crop given: the run's default). The decay 0.99 averages about the
# last 100 steps: the few-slices runs take 3 steps per epoch (24 slices, batch 8), 210 in all.
set -euo pipefail
OUT=${1:-seed-spread-runs}
SEEDS=${SEEDS:-"0 1 2 3 4"}
EMA=${EMA:-0.99}
METHODS=${METHODS:-"frequency_aware ae"}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
DATA=${DATA:-"$OUT/few"}
RUNS="$OUT/runs"
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
    for variant in plain ema; do
      run="$RUNS/$method-$variant-s$seed"
      flags=""
      [ "$variant" = ema ] && flags="--ema $EMA"
      if [ ! -f "$run/checkpoint.pt" ]; then
        # shellcheck disable=SC2086
        $PY -m medad_fast.cli train --method "$method" --data "$DATA" --preset small --seed "$seed" --out "$run" \
          --no-progress --device cpu $flags > "$run.train.log" 2>&1
      fi
      evaluate "$run/eval-test" "$run"
    done
  done
  # 3-seed ensembles of the plain runs: seeds i, i+1, i+2 (cyclically)
  set -- $SEEDS
  n=$#
  seeds=("$@")
  for ((i = 0; i < n; i++)); do
    members=()
    for ((j = 0; j < 3 && j < n; j++)); do
      members+=("$RUNS/$method-plain-s${seeds[$(((i + j) % n))]}")
    done
    evaluate "$RUNS/$method-ensemble3-s${seeds[$i]}" --ensemble "${members[@]}"
  done
done
$PY - "$RUNS" "$SEEDS" "$METHODS" <<'EOF'
import json, statistics, sys
from pathlib import Path
runs, seeds, methods = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
print("| method | training | n | image AUROC (mean ± sd) | pixel AP (mean ± sd) | pixel AUROC (mean) |")
print("|---|---|---|---|---|---|")
for method in methods:
    for variant, where in (("plain", "{}/eval-test"), ("ema", "{}/eval-test"), ("3-seed ensemble", "{}")):
        tag = {"3-seed ensemble": "ensemble3"}.get(variant, variant)
        found = [json.loads(p.read_text()) for s in seeds
                 if (p := runs / where.format(f"{method}-{tag}-s{s}") / "metrics.json").is_file()]
        if not found:
            continue
        def cell(key):
            values = [m[key] for m in found]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.3f}{spread}"
        print(f"| {method} | {variant} | {len(found)} | {cell('image_auroc')} | {cell('pixel_ap')} | "
              f"{statistics.mean(m['pixel_auroc'] for m in found):.3f} |")
EOF
