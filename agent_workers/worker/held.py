"""Messages held for their ``eta``/``countdown``: still unacknowledged, waiting on the event-loop timer.

On a Redis broker an unacknowledged message is restored to its queue once it is older than the visibility timeout
(kombu's ``QoS.restore_visible``), so a countdown longer than that timeout would be handed to another worker, held
there too, and served once per holder. While this worker lives it keeps its held messages' entries in the unacked
index fresh (a ``ZADD XX`` of the current time every quarter of the timeout): kombu's sweep leaves them alone, and
if this worker dies, fast reclaim (reclaim.py) brings them back within seconds, as any unacknowledged message.
"""

from __future__ import annotations

from typing import Any

from agent_workers.worker.kombu_redis import keeps_unacked_index, touch_unacked


class HeldMessages:
    """The requests a batcher holds for their eta, kept from kombu's visibility sweep while this worker lives."""

    def __init__(self, *, timer: Any, visibility_timeout: float) -> None:
        self.timer = timer
        self.visibility_timeout = float(visibility_timeout)
        self._held: dict[int, Any] = {}
        self._tref: Any = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request: Any, delay: float) -> None:
        """Track ``request``, held for ``delay`` seconds."""
        self._held[id(request)] = request
        long = delay >= self.visibility_timeout / 2
        if long and self._tref is None and keeps_unacked_index(request.message):
            self._tref = self.timer.call_repeatedly(max(1.0, self.visibility_timeout / 4), self._touch)

    def release(self, request: Any) -> None:
        """Stop tracking ``request`` (admitted to a batch)."""
        self._held.pop(id(request), None)

    def _touch(self) -> None:
        if not self._held:
            if self._tref is not None:
                self._tref.cancel()
                self._tref = None
            return
        touch_unacked([req.message for req in self._held.values()])
