#!/bin/bash
# Few normal slices: the frequency_aware small preset on `medad-fast phantom --few-slices`
# (24 normal training slices, small faint test lesions), with and without --augment and
# --val-fraction, several seeds; prints a table of evaluate's image AUROC and pixel AP.
#
#   benchmarks/small_data.sh [OUT]        (default small-data-runs; SEEDS="0 1 2 3 4" by default)
#
# Rows: base (24 slices), aug (--augment), val (--val-fraction 0.25: 18 trained on, the best
# epoch by the synthetic validation score), augval (both), base18 (--max-train-images 18: what
# the held-back slices cost without any selection). Finished runs are reused. One thread per
# run (OMP_NUM_THREADS=1); about a minute per run on an idle 2-core machine.
set -euo pipefail
OUT=${1:-small-data-runs}
SEEDS=${SEEDS:-"0 1 2 3 4"}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT/runs"
[ -f "$OUT/few/manifest.json" ] || $PY -m medad_fast.cli phantom "$OUT/few" --few-slices --no-progress
for seed in $SEEDS; do
  for cfg in base aug val augval base18; do
    case $cfg in
      base) flags="";;
      aug) flags="--augment";;
      val) flags="--val-fraction 0.25";;
      augval) flags="--augment --val-fraction 0.25";;
      base18) flags="--max-train-images 18";;
    esac
    run="$OUT/runs/$cfg-s$seed"
    [ -f "$run/eval-test/metrics.json" ] && continue
    # shellcheck disable=SC2086
    $PY -m medad_fast.cli train --data "$OUT/few" --preset small --seed "$seed" --out "$run" --no-progress \
      --device cpu $flags > "$run.train.log" 2>&1
    $PY -m medad_fast.cli evaluate "$run" --data "$OUT/few" --no-progress --cases 0 --device cpu > "$run.eval.log" 2>&1
  done
done
$PY - "$OUT" "$SEEDS" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, seeds = Path(sys.argv[1]), sys.argv[2].split()
print("| run | seeds | image AUROC (mean ± sd) | pixel AP (mean ± sd) | pixel AUROC | epochs scored |")
print("|---|---|---|---|---|---|")
for cfg in ("base", "aug", "val", "augval", "base18"):
    found = [json.loads(p.read_text()) for s in seeds
             if (p := out / "runs" / f"{cfg}-s{s}" / "eval-test" / "metrics.json").is_file()]
    if not found:
        continue
    def cell(key):
        values = [m[key] for m in found]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"
    print(f"| {cfg} | {len(found)} | {cell('image_auroc')} | {cell('pixel_ap')} | {cell('pixel_auroc')} | "
          f"{', '.join(str(m['epoch']) for m in found)} |")
EOF
