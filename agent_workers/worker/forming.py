"""Batch formation: which of a flush's requests compute together.

A model of fixed shapes is cut into slices of ``max_batch_size`` in the flush's order, exactly as before. A model
with a variable-length input (worker/padding.py) is cut under a token budget too: a batch's cost is its size times
its longest member (TEI's padded cost, ``max_batch_tokens`` 16384 by default), and

* with ``length_batching`` on (the default), the flush is sorted by length and sliced greedily from the shortest,
  so each batch holds requests of similar length and pays little padding (sort-and-slice, as infinity does across
  its queue; TEI#65 asks for it); the batches then compute in the order of their most urgent member (the flush
  arrives ordered by deadline and priority, else by arrival), so the request that waited longest goes first
  whatever its length;
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

T = TypeVar("T")


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
    order = sorted(range(len(rows)), key=lengths.__getitem__) if by_length else list(range(len(rows)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        if current and (len(current) >= size or (len(current) + 1) * grown > max_tokens):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    if by_length:
        batches.sort(key=min)  # the batch holding the most urgent (earliest) row computes first
    return [[rows[i] for i in batch] for batch in batches]


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
