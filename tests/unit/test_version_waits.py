"""Requests waiting for a min_version: one timer and one head read per model, failed at the bound, not after it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agent_workers.worker import version_waits as module
from agent_workers.worker.version_waits import POLL_S, VersionWaits


class Loop:
    """A fake clock and kombu timer: ``call_after`` entries fire in time order as the test advances."""

    def __init__(self) -> None:
        self.now = 50.0
        self.entries: list[tuple[float, Any, tuple[Any, ...]]] = []

    def monotonic(self) -> float:
        return self.now

    def call_after(self, delay: float, fun: Any, args: tuple[Any, ...] = ()) -> Any:
        self.entries.append((self.now + delay, fun, args))
        return SimpleNamespace(cancel=lambda: None)

    def run_until(self, t: float) -> None:
        while self.entries and min(e[0] for e in self.entries) <= t:
            entry = min(self.entries, key=lambda e: e[0])
            self.entries.remove(entry)
            self.now = entry[0]
            entry[1](*entry[2])
        self.now = t


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> Loop:
    fake = Loop()
    monkeypatch.setattr(module.time, "monotonic", fake.monotonic)
    return fake


def _req(min_version: int) -> SimpleNamespace:
    return SimpleNamespace(min_version=min_version, behind_since=None)


def test_many_waiting_requests_cost_one_timer_and_one_head_read_per_poll(loop: Loop) -> None:
    reads: list[str] = []
    head = {"m": 1}
    admitted: list[Any] = []
    waits = VersionWaits(
        timer=loop,
        head=lambda m: reads.append(m) or head[m],
        admit=admitted.append,
        fail=lambda *a: pytest.fail("failed"),
        wait_s=1.0,
    )
    requests = [_req(2) for _ in range(50)]
    waits.add("m", requests)
    assert len(loop.entries) == 1 and len(waits) == 50
    loop.run_until(loop.now + 10 * POLL_S + 1e-9)
    assert len(reads) == 10 and not admitted  # one read per poll for all 50
    head["m"] = 2
    loop.run_until(loop.now + POLL_S)
    assert admitted == requests and len(waits) == 0 and not loop.entries


def test_a_version_that_never_comes_fails_at_the_bound(loop: Loop) -> None:
    failed: list[tuple[str, int | None, list[Any], float]] = []
    waits = VersionWaits(
        timer=loop,
        head=lambda m: 1,
        admit=lambda r: pytest.fail("admitted"),
        fail=lambda m, v, reqs: failed.append((m, v, reqs, loop.now)),
        wait_s=1.0,
    )
    start = loop.now
    req = _req(5)
    waits.add("m", [req])
    loop.run_until(start + 5.0)
    assert len(failed) == 1
    model, version, reqs, at = failed[0]
    assert (model, version, reqs) == ("m", 1, [req])
    assert at == pytest.approx(start + 1.0)  # on the fake clock: at the bound, not a poll (or seconds) after it
    assert not loop.entries
