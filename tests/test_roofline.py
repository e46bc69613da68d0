"""benchmarks/roofline.py's pure parts: the flop count of a known convolution and matrix
product against the hand count, and its RESULTS.md section (rendering, merging, kept by
benchmarks/report.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import roofline  # noqa: E402


def test_flops_of_a_matrix_product_are_two_per_multiply_add():
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    assert roofline.count_flops(lambda: a @ b) == 2 * 4 * 5 * 6


def test_flops_of_a_convolution_forward_and_backward():
    # B=2, Cin=3 -> Cout=8, 3x3 kernel, padding 1 on 16x16: B * Cout * H * W outputs, each Cin * 9 multiply-adds
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    forward = 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    assert roofline.count_flops(lambda: F.conv2d(x, w, padding=1)) == forward
    # backward: the gradient of the input and of the weight, each as much work as the forward
    assert roofline.count_flops(lambda: F.conv2d(x, w, padding=1).sum().backward()) == 3 * forward


def test_best_time_is_the_fastest_call():
    delays = iter([0.0, 0.2, 0.01, 0.2])  # warm-up, then three timed calls

    def call():
        import time
        time.sleep(next(delays))

    assert 0.01 <= roofline.best_time(call, rounds=3) < 0.15


def fake_results(matmul: float = 100e9) -> dict:
    row = {"method": "frequency_aware", "preset": "paper", "job": "train step", "batch": 2, "preset_batch": 8,
           "side": 256, "flops": 10e9, "seconds": 0.5}
    return {"command": "benchmarks/roofline.py", "date": "2026-12-01 12:00 UTC", "commit": "abc1234",
            "cpu": "test CPU", "torch": "2.13", "python": "3.11", "rounds": 3, "matmul_side": 2048,
            "note": "The paper preset runs at batch 2 here.",
            "runs": [{"threads": 2, "matmul_flops": matmul, "rows": [row]}],
            "breakdown": {"preset": "small", "threads": 2, "steps": 5, "step": 0.1, "unprofiled_step": 0.09,
                          "parts": {"synthesis": 0.005, "other": 0.01}}}


def test_section_shows_the_rate_its_share_of_matmul_and_the_batch_used():
    text = roofline.render_section(fake_results())
    assert text.startswith(roofline.SECTION)
    # 10 GFLOP in 0.5 s = 20 GFLOP/s = 20 % of 100 GFLOP/s; batch 2 of the preset's 8
    assert "| frequency_aware | paper | train step | 2 (preset: 8) | 256 | 10.000 | 500.0 | 20.00 | 20.0 % |" in text
    assert "### 2 threads (wall time): matmul 100.0 GFLOP/s" in text
    assert "| synthesis | 5.00 | 5.0 % |" in text and "| other | 10.00 | 10.0 % |" in text


def test_merging_replaces_only_its_own_section():
    other = "# Benchmarks\n\n## Targets\n\nrows\n\n## CT volume prediction\n\nvolume rows\n"
    first = roofline.merge_section(other, roofline.render_section(fake_results(100e9)))
    assert first.startswith(other.rstrip("\n")) and "20.0 %" in first
    second = roofline.merge_section(first, roofline.render_section(fake_results(50e9)))
    assert second.count(roofline.SECTION) == 1 and "40.0 %" in second and "20.0 %" not in second
    assert "## CT volume prediction\n\nvolume rows" in second
    # a section before another one keeps the one after it
    before = roofline.merge_section(roofline.SECTION + "\n\nold\n\n## After\n\nkept\n", "%s\n\nnew\n" % roofline.SECTION)
    assert "old" not in before and "new" in before and "## After\n\nkept" in before


def test_report_keeps_the_saved_section(tmp_path, monkeypatch):
    import json

    import report

    saved = tmp_path / "roofline.json"
    saved.write_text(json.dumps(fake_results()))
    monkeypatch.setattr(roofline, "RESULTS_JSON", saved)
    run = report.Run(threads=2, results=report.Results({}), pytest_command="-", load_before=0.0, load_after=0.0,
                     wall_s=0.0)
    text = report.render([run], {"usable cores": 2}, "benchmarks/report.py")
    assert roofline.render_section(fake_results()).strip() in text


@pytest.mark.parametrize("side", [64])
def test_matmul_rate_is_positive(side):
    assert roofline.matmul_rate(side, rounds=1) > 0
