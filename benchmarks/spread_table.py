"""The Markdown table of a seed study: per row, the mean and sample standard deviation over
its runs of ``evaluate``'s image AUROC, pixel AP and pixel AUROC (``benchmarks/small_data.sh``,
``benchmarks/seed_spread.sh``).

    python benchmarks/spread_table.py --row LABEL METRICS.json... [--row LABEL METRICS.json...]

A ``metrics.json`` that does not exist (a run not finished) is left out of its row; a row
with none is not printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = (("image AUROC", "image_auroc"), ("pixel AP", "pixel_ap"), ("pixel AUROC", "pixel_auroc"))


def cell(values: list[float]) -> str:
    """``mean ± sd`` (the sample sd; the mean alone for one value)."""
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def table(rows: list[tuple[str, list[Path]]]) -> str:
    lines = ["| run | n | " + " | ".join(f"{name} (mean ± sd)" for name, _ in COLUMNS) + " | epochs scored |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for label, paths in rows:
        found = [json.loads(path.read_text()) for path in paths if path.is_file()]
        if not found:
            continue
        cells = [cell([m[key] for m in found]) for _, key in COLUMNS]
        epochs = ", ".join(str(m.get("epoch")) for m in found)
        lines.append(f"| {label} | {len(found)} | " + " | ".join(cells) + f" | {epochs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", nargs="+", action="append", required=True, metavar=("LABEL", "METRICS"),
                        help="a row's label, then its runs' metrics.json files")
    args = parser.parse_args(argv)
    print(table([(label, [Path(p) for p in paths]) for label, *paths in args.row]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
