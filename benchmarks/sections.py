"""The sections of ``RESULTS.md`` that benchmarks run on their own (``volume_throughput.py``,
``roofline.py``) write: each is a ``## Title`` block rendered from its saved JSON, replaced in
place when re-measured and kept by ``report.py`` when it rewrites the file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path


def merge_section(results_md: str, section: str) -> str:
    """``results_md`` with the section titled like ``section``'s first line (``## ...``)
    replaced by ``section``, or ``section`` appended when there is none."""
    title = section.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(results_md):
        return pattern.sub(lambda _: section + "\n", results_md, count=1).rstrip("\n") + "\n"
    return results_md.rstrip("\n") + "\n\n" + section


def saved_section(json_path: Path, render: Callable[[dict], str]) -> str | None:
    """``render`` of the saved results in ``json_path``, or None when they were never measured."""
    return render(json.loads(json_path.read_text())) if json_path.is_file() else None


def write_section(data: dict, json_path: Path, results_md: Path, render: Callable[[dict], str]) -> str:
    """Print ``render(data)``, save ``data`` to ``json_path`` and put the section into
    ``results_md`` (both written atomically). Returns the section."""
    from medad_fast.io import atomic_write_json, atomic_write_text

    section = render(data)
    atomic_write_json(json_path, data)
    atomic_write_text(results_md, merge_section(results_md.read_text() if results_md.is_file() else "", section))
    print(f"wrote {json_path} and {results_md}")
    return section
