"""Adaptive group size: how many queued steps of one model a trainer walks before it commits, chosen from the
conflicts it observes (additive increase, multiplicative decrease, as TCP sizes its window).

Several trainers draining one model's queue each read the head, walk a group and commit; a group whose walk
overlaps another's commit loses its compare-and-set. The shorter the walk against the rest of a trainer's cycle
(receiving, decoding, writing results, acknowledging), the less often walks overlap, and a group that conflicts
with at most τ steps under it can be rebased instead of recomputed. So a conflict halves the group and every clean
commit grows it by one step, up to the cap: alone, a trainer climbs to the cap and stays there.
"""

from __future__ import annotations

#: The smallest group a trainer shrinks to (a group of one is the per-step commit).
MIN_GROUP = 1


class GroupSizer:
    """The group size of each model a trainer serves, from its commits' conflicts.

    Example::

        sizer = GroupSizer(start=8, cap=32)
        k = sizer.size("m")                    # 8
        sizer.observe("m", steps=k, conflicts=1)
        sizer.size("m")                        # 4

    Args:
        start: the size of a model's first group (``AGENT_WORKERS_TRAIN_GROUP``).
        cap: the largest size (``AGENT_WORKERS_TRAIN_GROUP_MAX``); at most ``start``, the size stays ``start``
            (a fixed group size, as before sizes adapted).
    """

    def __init__(self, *, start: int, cap: int) -> None:
        self.start = max(MIN_GROUP, start)
        self.cap = max(self.start, cap)  # config.py refuses a cap below the start; a library caller gets the start
        self._sizes: dict[str, int] = {}

    def size(self, model: str) -> int:
        """The size of ``model``'s next group."""
        return self._sizes.get(model, self.start)

    def largest(self) -> int:
        """The largest next group of any model: how many buffered requests make a worker's flush worth serving."""
        return max(self._sizes.values(), default=self.start)

    def observe(self, model: str, *, steps: int, conflicts: int) -> int:
        """Record a committed group of ``steps`` that lost ``conflicts`` compare-and-sets; returns the next size.

        A group that never reached its commit (every step failed, or the store was down) says nothing about
        contention: pass ``steps=0`` and the size stays.
        """
        current = self.size(model)
        if self.cap == self.start:
            return current
        if conflicts > 0:
            current = max(MIN_GROUP, current // 2**conflicts)
        elif steps > 0:
            current = min(self.cap, current + 1)
        self._sizes[model] = current
        return current
