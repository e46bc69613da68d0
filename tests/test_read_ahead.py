"""`read_ahead`: the next scan is read while the current one is processed, in order, and a
loader's error surfaces when its result is due (after the scans before it)."""

from __future__ import annotations

import threading

import pytest

from medad_fast.volume_inference import read_ahead


def test_next_load_runs_while_the_current_result_is_processed():
    started = [threading.Event() for _ in range(3)]

    def loader(i):
        def load():
            started[i].set()
            return i
        return load

    seen = []
    for value in read_ahead([loader(0), loader(1), loader(2)]):
        if value + 1 < 3:  # the caller still holds `value`: the next read has already begun
            assert started[value + 1].wait(timeout=10)
        seen.append(value)
    assert seen == [0, 1, 2]
    assert list(read_ahead([])) == []


def test_a_failing_load_is_raised_after_the_results_before_it():
    def broken():
        raise ValueError("scan b.nii.gz is truncated")

    results = read_ahead([lambda: "a", broken, lambda: "c"])
    assert next(results) == "a"
    with pytest.raises(ValueError, match="b.nii.gz"):
        next(results)
