"""The backlog of unsettled outcomes: retried from the timer with backoff, requeued after a bounded time."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import states

from agent_workers.worker import backlog as backlog_module
from agent_workers.worker.backlog import FIRST_RETRY_S, LONGEST_RETRY_S, Backlog
from agent_workers.worker.intake import Intake
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome


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


class FakeMessage:
    def __init__(self) -> None:
        self.channel = SimpleNamespace()
        self.acknowledged = False

    def ack(self) -> None:
        self.acknowledged = True


class FakeWriter:
    """Stores per the script: an exception raises for the whole round trip, else the per-outcome replies."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls: list[list[str]] = []

    def write(self, outcomes: list[Outcome]) -> list[bool | None]:
        self.calls.append([o.request.id for o in outcomes])
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def _intake(writer: FakeWriter, send_task: Any, timer: FakeTimer) -> Intake:
    intake = Intake.__new__(Intake)  # only what settling outcomes touches
    intake.writer = writer
    intake.app = SimpleNamespace(send_task=send_task, settings=SimpleNamespace(broker_is_redis=True))
    intake.reporter = SimpleNamespace(report=lambda done: None)
    intake.backlog = Backlog(timer=timer, settle=intake._settle, requeue=lambda o: None, give_up_after=30.0)
    return intake


def _outcome(task_id: str, state: str) -> Outcome:
    req = Pending(task_id, "agent_workers.predict", FakeMessage(), [], {}, {}, 0.0, None)
    return Outcome(req, state, RuntimeError("x") if state == states.RETRY else {"outputs": [1.0]}, retry_countdown=0.5)


def test_a_failed_store_or_one_failed_command_is_retried_then_acknowledged(clock: Clock) -> None:
    timer = FakeTimer()
    writer = FakeWriter(redis.ConnectionError("down"), [True, None], [True])
    intake = _intake(writer, lambda *a, **k: None, timer)
    a, b = _outcome("a", states.SUCCESS), _outcome("b", states.SUCCESS)
    intake._settle([a, b])
    assert not a.request.message.acknowledged and len(intake.backlog) == 2
    timer.fire()  # stored: a; b's command failed alone
    assert a.request.message.acknowledged and not b.request.message.acknowledged
    timer.fire()
    assert b.request.message.acknowledged and writer.calls == [["a", "b"], ["a", "b"], ["b"]]


def test_a_retry_whose_republish_fails_is_published_again_not_stranded(clock: Clock) -> None:
    timer = FakeTimer()
    published: list[str] = []

    def send_task(name: str, **kw: Any) -> None:
        if not published:
            published.append("refused")
            raise ConnectionError("broker refused the publish")
        published.append(kw["task_id"])

    writer = FakeWriter([True])
    intake = _intake(writer, send_task, timer)
    retry = _outcome("r", states.RETRY)
    intake._settle([retry])
    assert not retry.request.message.acknowledged and len(intake.backlog) == 1
    timer.fire()
    assert published == ["refused", "r"] and retry.request.message.acknowledged
    assert writer.calls == [["r"]]  # RETRY was stored once; only the publish was tried again
