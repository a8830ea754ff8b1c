"""The backlog of unsettled outcomes: retried from the timer with backoff, requeued after a bounded time."""

from __future__ import annotations

from typing import Any

import pytest

from agent_workers.worker import backlog as backlog_module
from agent_workers.worker.backlog import FIRST_RETRY_S, LONGEST_RETRY_S, Backlog


class FakeTimer:
    """kombu's timer as the backlog uses it: ``call_after``; a test fires the calls by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, Any]] = []

    def call_after(self, delay: float, fun: Any) -> Any:
        self.calls.append((delay, fun))
        return self

    def cancel(self) -> None:
        pass

    def fire(self) -> None:
        _, fun = self.calls.pop(0)
        fun()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(backlog_module.time, "monotonic", c)
    return c


def test_unsettled_outcomes_are_retried_with_backoff_then_requeued(clock: Clock) -> None:
    timer = FakeTimer()
    settled: list[list[str]] = []
    requeued: list[list[str]] = []
    failing = {"up": False}

    def settle(outcomes: list[str]) -> None:
        settled.append(list(outcomes))
        if not failing["up"]:
            log.add(outcomes)  # fails again: back into the backlog

    log = Backlog(timer=timer, settle=settle, requeue=requeued.append, give_up_after=10.0)
    log.add(["a", "b"])
    delays = []
    while clock.now < 109:
        delays.append(timer.calls[0][0])
        clock.now += timer.calls[0][0]
        timer.fire()
    assert delays[0] == FIRST_RETRY_S and delays[1] == 2 * FIRST_RETRY_S and max(delays) == LONGEST_RETRY_S
    assert all(s == ["a", "b"] for s in settled) and not requeued
    clock.now = 110.0
    timer.fire()
    assert requeued == [["a", "b"]] and len(log) == 0 and not timer.calls


def test_a_backlog_that_settles_stops_retrying(clock: Clock) -> None:
    timer = FakeTimer()
    settled: list[list[str]] = []
    log = Backlog(timer=timer, settle=settled.append, requeue=lambda o: None, give_up_after=10.0)
    log.add(["a"])
    timer.fire()
    assert settled == [["a"]] and len(log) == 0 and not timer.calls
    log.add(["b"])  # a new outage starts from the first delay again
    assert timer.calls[0][0] == FIRST_RETRY_S
