"""One deadline per client call, enforced on every blocking socket operation whatever the library does.

redis-py (before 8, and for a server that is frozen rather than gone) and py-amqp (a stalled link: a resource
alarm, a partition without a reset) can block a read or a write for ever. Rather than trusting every library
version's timeout options, a call runs its blocking part under :meth:`Deadline.guard`: a timer that, if the part
is still running shortly after the deadline, cuts the socket it uses (``shutdown``), which makes the blocked
``recv``/``send`` return at once with an error the caller turns into our typed error.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

#: Seconds past the deadline before a blocked socket is cut (a reply arriving right on time still counts).
CUT_GRACE = 0.1


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
        must make its blocked socket operation fail (close or shut down the socket). ``self.cut`` says it did."""

        def fire() -> None:
            self.cut = True
            with contextlib.suppress(Exception):  # the socket may already be gone
                cut()

        timer = threading.Timer(self.left() + CUT_GRACE, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
