"""The worker's event loop wakes for a signal (agent_workers/worker/bootsteps.py SignalWakeup): Celery's SIGTERM
handler only sets a flag the loop reads between polls, and an idle RabbitMQ worker's poll lasted up to Celery's 2 s
event heartbeat before its warm shutdown began."""

from __future__ import annotations

import select
import signal
import threading
from types import SimpleNamespace

from kombu.asynchronous import Hub

from agent_workers.worker.bootsteps import SignalWakeup


def current_wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


def test_a_signal_makes_the_loops_pipe_readable_and_stop_restores_the_previous_wakeup_fd() -> None:
    hub = Hub()
    consumer = SimpleNamespace(hub=hub)
    step = SignalWakeup(consumer)
    before = current_wakeup_fd()
    previous_handler = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        step.start(consumer)
        assert step._fds is not None
        read, write = step._fds
        assert read in hub.readers and current_wakeup_fd() == write
        assert select.select([read], [], [], 0)[0] == []  # nothing to read before the signal
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # delivered to this thread before it returns
        assert select.select([read], [], [], 0)[0] == [read]  # the poll would return now, not at its next timer
        callback, args = hub.readers[read]  # what the loop calls then: it empties the pipe
        callback(*args)
        assert select.select([read], [], [], 0)[0] == []
    finally:
        step.stop(consumer)
        signal.signal(signal.SIGUSR1, previous_handler)
        hub.close()
    assert read not in hub.readers and current_wakeup_fd() == before
