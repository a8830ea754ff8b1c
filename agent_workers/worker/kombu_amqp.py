"""The py-amqp transport with an idle signal: after a delivery, when the socket holds no further frame, it tells
the intakes (:mod:`agent_workers.worker.idle`) so a lone request is served at once instead of after ``max_wait_ms``.

kombu's reader (``kombu/transport/base.py`` ``Transport._make_reader``) reads one frame per event-loop callback and
reschedules itself with ``hub.call_soon``; here the same reader also checks, after each frame, whether anything is
left to read: py-amqp's own read buffer (a partial frame), the TLS object's decrypted bytes, and the socket itself
(a zero-timeout ``select``). Only when all three are empty has the broker nothing more for us right now. Messages on
the wire are unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
from collections.abc import Iterator
from typing import Any

from amqp.exceptions import RecoverableConnectionError
from kombu.transport import pyamqp

from agent_workers.worker import idle

_UNAVAILABLE = (errno.EAGAIN, errno.EINTR)
logger = logging.getLogger(__name__)


def nothing_pending(connection: Any) -> bool:
    """Whether an ``amqp.Connection`` has no byte of a further frame buffered or waiting on its socket."""
    transport = getattr(connection, "transport", None)
    sock = getattr(transport, "sock", None)
    if sock is None:
        return True
    if getattr(transport, "_read_buffer", b""):
        return False
    pending = getattr(sock, "pending", None)  # an ssl.SSLSocket may hold decrypted bytes the socket no longer shows
    if pending is not None and pending():
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False  # a closed socket: the reader raises next and the consumer reconnects
    return not readable


def delivering(connection: Any) -> bool:
    """Whether the kombu ``Connection`` of a py-amqp consumer still holds bytes of a further frame: deliveries the
    broker already sent (within the prefetch window) that the reader has not handed over yet. False for any other
    transport, or when not connected (kombu's ``Connection.connection`` would connect: its private one is read)."""
    conn = getattr(connection, "_connection", None)
    return getattr(conn, "transport", None) is not None and not nothing_pending(conn)


@contextlib.contextmanager
def corked(channel: Any) -> Iterator[None]:
    """Frames written on ``channel``'s connection inside this block go out in one ``sendall`` when it ends (a batch
    of ``basic_ack`` frames: one system call instead of one per message). Anything but a py-amqp connection (or one
    that is not connected) writes as usual.

    ``basic_ack(multiple=True)`` would be one frame, but it acknowledges every earlier delivery on the channel,
    including requests still buffered, held for their eta or computing; one write of exact acks is as cheap.
    """
    transport = getattr(getattr(channel, "connection", None), "transport", None)
    if transport is None or not hasattr(transport, "_write"):
        yield
        return
    own = transport.__dict__.get("_write")  # TCPTransport: the socket's sendall; SSLTransport: a method
    frames: list[bytes] = []
    transport._write = lambda data: frames.append(bytes(data))  # frame_writer reuses its buffer: copy
    try:
        yield
    finally:
        if own is None:
            del transport._write
        else:
            transport._write = own
        if frames:
            try:
                transport.write(b"".join(frames))
            except Exception:  # noqa: BLE001 - the connection is gone: the broker redelivers what was not acked
                logger.warning(
                    "writing %d buffered frames failed; the broker will redeliver", len(frames), exc_info=True
                )


class _IdleReader:
    """kombu's frame reader, plus the idle signal once the socket is empty."""

    def __init__(self, transport: Any, connection: Any) -> None:
        self.client = transport.client
        self.connection = connection

    def __call__(self, loop: Any) -> None:
        connection = self.connection
        if not connection.connected:
            raise RecoverableConnectionError("Socket was disconnected")
        try:
            connection.drain_events(timeout=0)
        except TimeoutError:  # socket.timeout, raised by py-amqp when no whole frame is there
            self._maybe_drained()
            return
        except OSError as exc:
            if exc.errno in _UNAVAILABLE:
                self._maybe_drained()
                return
            raise
        self._maybe_drained()
        loop.call_soon(self, loop)

    def _maybe_drained(self) -> None:
        if nothing_pending(self.connection):
            idle.drained(self.client)


class Transport(pyamqp.Transport):
    """kombu's py-amqp transport (``amqp://``, ``pyamqp://``) with the idle signal, in the event loop
    (:meth:`on_readable`) and in Celery's blocking loop (:meth:`drain_events`)."""

    def drain_events(self, connection: Any, **kwargs: Any) -> Any:
        result = connection.drain_events(**kwargs)
        if nothing_pending(connection):
            idle.drained(self.client)
        return result

    def on_readable(self, connection: Any, loop: Any) -> None:
        reader = getattr(self, "_idle_reader", None)
        if reader is None or reader.connection is not connection:
            reader = self._idle_reader = _IdleReader(self, connection)
        reader(loop)
