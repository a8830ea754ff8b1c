"""The client's deadline: a socket still blocked at the deadline is cut; a guard that ended never fires."""

from __future__ import annotations

import socket
import time

import pytest

from agent_workers.client import deadline
from agent_workers.client.deadline import CUT_GRACE, Deadline


def test_a_blocked_read_is_cut_at_the_deadline() -> None:
    a, b = socket.socketpair()
    dl = Deadline(0.3)
    started = time.monotonic()
    with pytest.raises(OSError), dl.guard(lambda: a.shutdown(socket.SHUT_RDWR)):
        if not a.recv(1):  # nothing ever comes: only the cut ends this read (an empty read once shut down)
            raise OSError("cut")
    assert dl.cut and time.monotonic() - started < 0.3 + CUT_GRACE + 1.0
    a.close()
    b.close()


def test_a_guard_that_ended_never_fires_and_ended_guards_are_dropped() -> None:
    fired: list[int] = []
    dl = Deadline(0.05)
    for i in range(3000):
        with dl.guard(lambda i=i: fired.append(i)):
            pass
    assert len(deadline._WATCHDOG._heap) < 2100  # disarmed entries are compacted, not kept until they come due
    probe = Deadline(0.0)
    with probe.guard(lambda: None):
        end = time.monotonic() + 5
        while not probe.cut and time.monotonic() < end:
            time.sleep(0.01)  # noqa: sleep-ok - a poll interval bounded by a deadline
    assert probe.cut and fired == []
