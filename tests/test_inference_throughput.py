"""benchmarks/inference_throughput.py runs (--quick, one method) and writes its RESULTS.md section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import inference_throughput  # noqa: E402


def test_quick_run_writes_its_section(tmp_path, one_thread):
    pytest.importorskip("onnxruntime")
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    assert inference_throughput.main(["--quick", "--methods", "ae", "--threads", "1", "--out-json",
                                      str(tmp_path / "t.json"), "--out-md", str(results_md)]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert {(r["variant"], r["batch"]) for r in rows} == {(v, b) for v in inference_throughput.VARIANTS
                                                           for b in (1, 4)}
    assert all(r["method"] == "ae" and r["side"] == 32 and r["slices_per_s"] > 0 for r in rows)
    text = results_md.read_text()
    assert "## Other\n\nkept" in text and text.count(inference_throughput.SECTION) == 1
    assert "| ae | tiny | 32 | 4 | onnx |" in text
