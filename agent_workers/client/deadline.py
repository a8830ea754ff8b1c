"""One deadline per client call, enforced on every blocking socket operation whatever the library does.

redis-py (before 8, and for a server that is frozen rather than gone) and py-amqp (a stalled link: a resource
alarm, a partition without a reset) can block a read or a write for ever. Rather than trusting every library
version's timeout options, a call runs its blocking part under :meth:`Deadline.guard`: if the part is still
running shortly after the deadline, one watchdog thread cuts the socket it uses (``shutdown``), which makes the
blocked ``recv``/``send`` return at once with an error the caller turns into our typed error.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import threading
import time
from collections.abc import Callable, Iterator

#: Seconds a client call may take when its caller gives no ``timeout``.
DEFAULT_TIMEOUT = 60.0
#: Seconds past the deadline before a blocked socket is cut (a reply arriving right on time still counts).
CUT_GRACE = 0.1
#: Seconds between two cuts of a block that is still running (it may have opened a new connection since).
RECUT_INTERVAL = 0.1


class Deadline:
    """The moment a call must have returned or raised by: ``timeout`` seconds after it was made."""

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self.at = time.monotonic() + self.timeout
        self.cut = False

    def left(self) -> float:
        """Seconds left (0 once passed)."""
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    @contextlib.contextmanager
    def guard(self, cut: Callable[[], None]) -> Iterator[None]:
        """Run the block; if it is still running at the deadline (plus :data:`CUT_GRACE`), call ``cut``, which
        must make its blocked socket operation fail (close or shut down the socket), and again every
        :data:`RECUT_INTERVAL` until the block ends. ``self.cut`` says it did."""

        def fire() -> None:
            self.cut = True
            with contextlib.suppress(Exception):  # the socket may already be gone
                cut()

        entry = _WATCHDOG.arm(self.at + CUT_GRACE, fire)
        try:
            yield
        finally:
            _WATCHDOG.disarm(entry)


class _Entry:
    __slots__ = ("at", "cancelled", "fire")

    def __init__(self, at: float, fire: Callable[[], None]) -> None:
        self.at = at
        self.fire = fire
        self.cancelled = False

    def __lt__(self, other: _Entry) -> bool:
        return self.at < other.at


class _Watchdog:
    """One thread per process that fires the guards whose deadline passed (a thread per call would cost more than
    a small publish itself). Arming is a heap push; disarming just marks the entry."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._wake = threading.Condition()
        self._pid = 0
        self._cancelled = 0

    def arm(self, at: float, fire: Callable[[], None]) -> _Entry:
        entry = _Entry(at, fire)
        with self._wake:
            if self._pid != os.getpid():  # first use, or a forked child (threads do not survive fork)
                self._pid = os.getpid()
                self._heap = []
                self._cancelled = 0
                threading.Thread(target=self._run, name="aw-deadlines", daemon=True).start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wake.notify()
        return entry

    def disarm(self, entry: _Entry) -> None:
        with self._wake:
            entry.cancelled = True
            self._cancelled += 1
            if self._cancelled > 1024 and self._cancelled * 2 > len(self._heap):
                # Most entries are disarmed long before their deadline: drop them now, not when they come due.
                self._heap = [e for e in self._heap if not e.cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                    self._cancelled -= 1
                if not self._heap:
                    self._wake.wait()
                    continue
                left = self._heap[0].at - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                entry = heapq.heappop(self._heap)
            if not entry.cancelled:
                entry.fire()
                with self._wake:  # again until the block ends: it may be blocked on a connection made after the cut
                    if not entry.cancelled:
                        entry.at = time.monotonic() + RECUT_INTERVAL
                        heapq.heappush(self._heap, entry)


_WATCHDOG = _Watchdog()
