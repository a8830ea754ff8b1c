"""Predict requests waiting for their model to reach their ``min_version`` (read-your-writes).

They stay unacknowledged, out of the batch buffer, on the event loop: one timer and one head read per model per
poll, however many requests wait on it (re-admitting each request every poll used to cost a timer entry, a flush
and a head read per request). A request whose version appears is admitted to the next batch; one that waited
``AGENT_WORKERS_MIN_VERSION_WAIT_MS`` fails at that moment, from the timer (not at the first poll after it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between two head reads of a model that requests wait on.
POLL_S = 0.02


class VersionWaits:
    """Requests waiting per model for a version; event loop only.

    Args:
        timer: the consumer's kombu timer.
        head: the committed head version of a model (one Redis read; may raise when the store is unreachable).
        admit: called with each request whose model reached its ``min_version``.
        fail: called with ``(model, head version or None, requests)`` for requests that waited ``wait_s``.
        wait_s: how long a request may wait, seconds.
    """

    def __init__(
        self,
        *,
        timer: Any,
        head: Callable[[str], int],
        admit: Callable[[Any], None],
        fail: Callable[[str, int | None, list[Any]], None],
        wait_s: float,
    ) -> None:
        self.timer = timer
        self._head = head
        self._admit = admit
        self._fail = fail
        self.wait_s = wait_s
        self._waiting: dict[str, list[Any]] = {}
        self._trefs: dict[str, Any] = {}

    def __len__(self) -> int:
        return sum(len(reqs) for reqs in self._waiting.values())

    def add(self, model: str, requests: list[Any]) -> None:
        """Wait for ``model`` to reach each request's ``min_version`` (``behind_since`` marks the first wait)."""
        now = time.monotonic()
        for req in requests:
            if req.behind_since is None:
                req.behind_since = now
        self._waiting.setdefault(model, []).extend(requests)
        self._arm(model)

    def close(self) -> None:
        """Stop every timer (a replaced intake: its messages, on a dead channel, are redelivered by the broker)."""
        for tref in self._trefs.values():
            tref.cancel()
        self._trefs.clear()
        self._waiting.clear()

    def _arm(self, model: str) -> None:
        if model in self._trefs or not self._waiting.get(model):
            return
        give_up = min(req.behind_since for req in self._waiting[model]) + self.wait_s
        delay = max(0.0, min(POLL_S, give_up - time.monotonic()))
        self._trefs[model] = self.timer.call_after(delay, self._check, (model,))

    def _check(self, model: str) -> None:
        self._trefs.pop(model, None)
        waiting = self._waiting.pop(model, [])
        try:
            version: int | None = self._head(model)
        except Exception:  # noqa: BLE001 - store unreachable or model gone: keep waiting, fail at the bound
            log.debug("cannot read the head of %r while requests wait on it", model, exc_info=True)
            version = None
        now = time.monotonic()
        ready: list[Any] = []
        late: list[Any] = []
        still: list[Any] = []
        for req in waiting:
            if version is not None and req.min_version <= version:
                ready.append(req)
            elif now - req.behind_since >= self.wait_s:
                late.append(req)
            else:
                still.append(req)
        if still:
            self._waiting[model] = still
            self._arm(model)
        if late:
            self._fail(model, version, late)
        for req in ready:
            self._admit(req)
