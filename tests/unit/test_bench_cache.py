"""The cache benchmark's workload: a Zipf draw over a fixed pool of inputs (no network)."""

from __future__ import annotations

import numpy as np

from agent_workers.tools.bench.cache import WIDTH, zipf_rows


def test_zipf_rows_repeat_popular_inputs_and_are_reproducible() -> None:
    rows = zipf_rows(5_000, 100, 1.1, seed=3)
    assert rows.shape == (5_000, WIDTH) and rows.dtype == np.float32
    distinct, counts = np.unique(rows, axis=0, return_counts=True)
    assert len(distinct) <= 100
    assert counts.max() > 10 * np.median(counts)  # the head of the distribution dominates
    assert np.array_equal(rows, zipf_rows(5_000, 100, 1.1, seed=3))
