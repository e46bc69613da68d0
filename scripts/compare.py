"""The methods side by side on the demo's phantom data: one table, measured.

Runs `medad-fast train --method M` + `medad-fast evaluate` for every method, exactly as
`make demo` does for the paper's method (small preset, same data, same seed), then writes

    <out>/compare.md     markdown table: image/pixel AUROC, AP, AUPRO@0.3, Dice, minutes
    <out>/compare.json   the same figures, machine-readable

Resumable like `scripts/ablations.py` (a method whose evaluation exists is reused, on the
same data only). Usage::

    make compare                                     # after `make demo` (reuses its data)
    python scripts/compare.py --data demo_out/data --out demo_out/compare [--only ae]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablations import sweep  # noqa: E402

from medad_fast.methods import method_names  # noqa: E402

METHODS = {name: ["--method", name] for name in method_names()}


def main(argv: list[str] | None = None) -> int:
    return sweep(METHODS, "compare", argv, description=__doc__.split("\n\n")[0], first_column="method")


if __name__ == "__main__":
    sys.exit(main())
