"""The compute pipeline without a worker: a closed pipeline never runs two jobs at once."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest

from agent_workers.worker.pipeline import GIL_SWITCH_INTERVAL, Pipeline


class LoopHub:
    """A hub whose loop is the test: ``call_soon`` queues callbacks (thread-safe), ``run_ready`` runs them."""

    def __init__(self) -> None:
        self._ready: list[Any] = []
        self._lock = threading.Lock()
        self.woken = threading.Event()

    def call_soon(self, callback: Any, *args: Any) -> None:
        with self._lock:
            self._ready.append((callback, args))
        self.woken.set()

    def run_ready(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for callback, args in ready:
            callback(*args)


def test_a_job_submitted_after_close_waits_behind_the_one_still_computing() -> None:
    hub = LoopHub()
    finished: list[str] = []
    pipeline = Pipeline(depth=2, hub=hub, finish=finished.extend, on_free=lambda: None, name="t")
    entered, release = threading.Event(), threading.Event()
    ran: list[tuple[str, str]] = []

    def job(name: str, block: bool) -> Any:
        if block:
            entered.set()
            assert release.wait(10)
        ran.append((name, threading.current_thread().name))
        yield [name], False

    pipeline.submit(job("old", True))
    assert entered.wait(10)
    pipeline.close()  # the consumer restarted: its intake was replaced, the old job still computes
    pipeline.submit(job("late", False), inline=True)  # a late flush of the replaced intake
    assert ran == [], "the late job ran beside the job still computing"
    release.set()
    while len(finished) < 2:
        assert hub.woken.wait(10)
        hub.woken.clear()
        hub.run_ready()
    assert [name for name, _ in ran] == ["old", "late"] and finished == ["old", "late"]
    assert all(thread == "compute-t" for _, thread in ran)
    pipeline._thread.join(10)  # and the thread ends once nothing more is queued
    assert not pipeline._thread.is_alive()


def test_the_gil_switch_interval_shortens_once_a_job_goes_to_the_compute_thread() -> None:
    # The forward pass takes the GIL back between torch ops; at CPython's 5 ms it waits behind the event loop.
    # A worker whose batches all compute on the loop (inline) keeps the default.
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        hub = LoopHub()
        finished: list[str] = []
        pipeline = Pipeline(depth=2, hub=hub, finish=finished.extend, on_free=lambda: None, name="g")

        def job(name: str) -> Any:
            yield [name], False

        pipeline.submit(job("inline"), inline=True)
        assert finished == ["inline"] and sys.getswitchinterval() == pytest.approx(0.005)
        pipeline.submit(job("threaded"))
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL) and GIL_SWITCH_INTERVAL < 0.005
        while finished != ["inline", "threaded"]:
            assert hub.woken.wait(10)
            hub.woken.clear()
            hub.run_ready()
        pipeline.close()
    finally:
        sys.setswitchinterval(before)
