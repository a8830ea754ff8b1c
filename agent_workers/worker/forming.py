"""Batch formation: which of a flush's requests compute together.

A model of fixed shapes is cut into slices of ``max_batch_size`` in the flush's order, exactly as before. A model
with a variable-length input (worker/padding.py) is cut under a token budget too: a batch's cost is its size times
its longest member (TEI's padded cost, ``max_batch_tokens`` 16384 by default), and

* with ``length_batching`` on (the default), the flush is sorted by length and cut where padding would cost more
  than another forward pass (sort-and-slice, as infinity does across its queue and TEI#65 asks for, with the cut
  points chosen by a small dynamic programme), so each batch holds requests of similar length and pays little
  padding; the batches then compute in the order of their most urgent member (the flush arrives ordered by deadline
  and priority, else by arrival), so the request that waited longest goes first whatever its length;
* off, the flush is sliced in its own order (FIFO pad-to-longest, as TEI does): the benchmark's comparison.

Formation never holds a request back for a later flush: every request of a flush computes in it, so
``max_wait_ms``, deadlines and priorities bound each wait exactly as for fixed-shape models. A request longer than
the whole budget computes alone (a batch of one always forms); ``AGENT_WORKERS_MAX_INPUT_ELEMENTS`` is the
per-request limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from agent_workers import metrics

T = TypeVar("T")

#: What one more forward pass costs, in padded tokens: the price that splits a batch rather than pad its short members
#: (32 measured best of 8/32/128/512 for the text benchmark's encoder on one CPU thread; see docs/benchmarks.md).
BATCH_OVERHEAD_TOKENS = 32


def plan(
    rows: Sequence[T],
    *,
    max_batch_size: int,
    length: Callable[[T], int] | None = None,
    max_tokens: int = 0,
    by_length: bool = True,
) -> list[list[T]]:
    """Cut ``rows`` into batches.

    Args:
        rows: the flush's distinct inputs, most urgent first.
        max_batch_size: most rows per batch.
        length: a row's tokens (None: a fixed-shape model, sliced by ``max_batch_size`` alone).
        max_tokens: most ``rows × longest`` per batch (a row longer than that forms a batch alone).
        by_length: sort by length before slicing (off: slice in the given order).

    Returns:
        The batches, in the order they should compute; every row in exactly one.
    """
    size = max(1, max_batch_size)
    if length is None:
        return [list(rows[start : start + size]) for start in range(0, len(rows), size)]
    lengths = [length(r) for r in rows]
    batches = _cheapest_cuts(lengths, size, max_tokens) if by_length else _fifo_cuts(lengths, size, max_tokens)
    if by_length:
        batches.sort(key=min)  # the batch holding the most urgent (earliest) row computes first
    return [[rows[i] for i in batch] for batch in batches]


def _fifo_cuts(lengths: list[int], size: int, max_tokens: int) -> list[list[int]]:
    """Slices in the given order, each as long as ``size`` and the budget allow (TEI's FIFO)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        if current and (len(current) >= size or (len(current) + 1) * grown > max_tokens):
            batches.append(current)
            current, grown = [], n
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


def _cheapest_cuts(lengths: list[int], size: int, max_tokens: int) -> list[list[int]]:
    """Sort by length, then cut the sorted run where the total cost is least: each batch costs
    ``BATCH_OVERHEAD_TOKENS + rows × longest`` (a dynamic programme over cut points, O(rows × size), vectorized).

    Greedy slicing fills each batch to ``size`` first and so pads a batch's short members to a long tail member;
    pricing the padding against one more forward pass keeps batches of similar lengths whole and splits the tail.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    ends = np.asarray(lengths)[order]
    count = len(ends)
    best = np.full(count + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(count + 1, dtype=np.int64)
    for j in range(1, count + 1):
        low = max(0, j - size)
        rows = j - np.arange(low, j)  # batch sizes if the batch ending at j starts at low, low + 1, ...
        padded = rows * int(ends[j - 1])
        cost = best[low:j] + BATCH_OVERHEAD_TOKENS + padded
        cost[(padded > max_tokens) & (rows > 1)] = np.inf  # over the budget; a batch of one always forms
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], low + k
    batches: list[list[int]] = []
    j = count
    while j > 0:
        batches.append(order[cut[j] : j].tolist())
        j = int(cut[j])
    return batches[::-1]


def shares(sizes: Sequence[tuple[int, ...]], elapsed: float) -> list[dict[str, Any]]:
    """What each member of one computed batch used: the ``batch`` metadata of its result (contract 1.3).

    Args:
        sizes: each member's variable sizes (its length, for one variable dim).
        elapsed: the batch's forward-pass seconds, shared in proportion to real tokens.

    Returns:
        Per member: ``size`` (rows computed together), ``tokens`` (real), ``padded_tokens`` (what it was padded
        to: the product of the batch's longest sizes), ``compute_ms`` (its share).
    """
    tokens = [math.prod(s) for s in sizes]
    padded = math.prod(max(s[i] for s in sizes) for i in range(len(sizes[0])))
    total = sum(tokens) or 1
    ms = 1000.0 * elapsed
    return [
        {"size": len(tokens), "tokens": n, "padded_tokens": padded, "compute_ms": round(ms * n / total, 3)}
        for n in tokens
    ]


def usage(model: str, sizes: Sequence[tuple[int, ...]], elapsed: float) -> list[dict[str, Any]]:
    """:func:`shares` of one computed padded batch, counted into the padding-waste metric
    (``agent_workers_batch_tokens_total{kind=real|padding}``)."""
    used = shares(sizes, elapsed)
    real = sum(u["tokens"] for u in used)
    metrics.BATCH_TOKENS.labels(model, "real").inc(real)
    metrics.BATCH_TOKENS.labels(model, "padding").inc(used[0]["padded_tokens"] * len(used) - real)
    return used
