"""The broker's "nothing more to hand over now" signal, from the transport to the intakes on its connection.

A batch that waits ``max_wait_ms`` for company that is not coming costs a lone request its whole wait. The
transports know better than any timer when nothing more is on its way: the Redis pop returned fewer messages than
it asked for (or left its lists empty), or the AMQP socket holds no further frame after a delivery. They call
:func:`drained` with their kombu connection, and every intake subscribed to that connection flushes what it holds.
Under load neither happens (the pop comes back full, the socket always holds the next frame), so batches still fill
to ``max_batch_size``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_listeners: dict[int, list[Callable[[], None]]] = {}


def subscribe(connection: Any, callback: Callable[[], None]) -> None:
    """Call ``callback`` whenever the transport of ``connection`` (a kombu ``Connection``) has drained."""
    if connection is not None:
        _listeners.setdefault(id(connection), []).append(callback)


def unsubscribe(connection: Any, callback: Callable[[], None]) -> None:
    """Stop calling ``callback`` for ``connection``."""
    callbacks = _listeners.get(id(connection), [])
    if callback in callbacks:
        callbacks.remove(callback)
    if not callbacks:
        _listeners.pop(id(connection), None)


def drained(connection: Any) -> None:
    """The transport of ``connection`` delivered everything it had: tell the subscribers. Never raises."""
    for callback in list(_listeners.get(id(connection), ())):
        try:
            callback()
        except Exception:  # noqa: BLE001 - a flush fault must not stop the consumer's event loop
            log.exception("flushing on an idle broker failed")
