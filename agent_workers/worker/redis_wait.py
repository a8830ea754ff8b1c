"""How long the Redis transport's ``BLMOVE`` waits, and on which list, when a worker has several lists to watch.

``BLMOVE`` watches one list, and every wake-up sweeps all of them (every queue, every priority sub-list). The list
watched is the queue that last delivered (traffic tends to stay where it is: a training burst on a worker that
consumes both queues), and the wait is short right after traffic (a windowed producer's next message is due within
milliseconds, maybe on another list), doubling with each quiet wake-up up to ``wake_interval``, so an idle worker
still sweeps rarely. Before, the watched list rotated blindly and every wait was a quarter second: a worker consuming
both queues left ``Client.train`` (the demo) waiting ~250 ms every few groups.
"""

from __future__ import annotations

from typing import Any

#: The longest wait (the ``wake_interval`` broker transport option overrides it).
DEFAULT_WAKE_INTERVAL = 0.25
#: The shortest wait after traffic; it doubles with each quiet wake-up up to ``wake_interval``.
MIN_WAKE_INTERVAL = 0.002
_MAX_DOUBLINGS = 16


class WakePolicy:
    """The watched list and the wait of one channel.

    Args:
        sep: kombu's priority separator (a priority sub-list is ``<queue><sep><priority>``).
        ceiling: the longest wait, in seconds (``wake_interval``).
    """

    def __init__(self, sep: str, ceiling: float = DEFAULT_WAKE_INTERVAL) -> None:
        self.sep = sep
        self.ceiling = ceiling
        self.quiet = 0  # wake-ups without a message since the last traffic
        self.last: str | None = None  # the queue that last delivered
        self.turn = -1

    @property
    def wait(self) -> float:
        """Seconds the next ``BLMOVE`` may wait."""
        return min(self.ceiling, MIN_WAKE_INTERVAL * 2**self.quiet)

    def watched(self, queues: list[str]) -> str:
        """The list to watch: the queue that last delivered while traffic lasts, else the next one in turn."""
        if self.last in queues and self.quiet == 0:
            return self.last
        self.turn = (self.turn + 1) % len(queues)
        return queues[self.turn]

    def after_pop(self, popped: list[tuple[Any, ...]]) -> None:
        """Record a pop's (list key, ...) tuples: traffic resets the wait, an empty pop lengthens it."""
        if popped:
            self.quiet = 0
            self.last = popped[-1][0].rsplit(self.sep, 1)[0]
        else:
            self.quiet = min(self.quiet + 1, _MAX_DOUBLINGS)
