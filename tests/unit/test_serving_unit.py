"""Deadlines, priorities, the result cache and the byte caps, without a broker."""

from __future__ import annotations

import gc
import time
import weakref
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import torch

from agent_workers.config import BatchSettings
from agent_workers.store.blobs import Snapshot, SnapshotCache
from agent_workers.worker import deadlines
from agent_workers.worker.cache import ResultCache, distinct
from agent_workers.worker.policy import BatchPolicy
from agent_workers.worker.requests import Pending


def _req(i: int, *, priority: int | None = None, deadline_ms: int | None = None, expires: datetime | None = None):
    kwargs = {} if deadline_ms is None else {"deadline_ms": deadline_ms}
    message = SimpleNamespace(properties={} if priority is None else {"priority": priority})
    return Pending(str(i), "p", message, ["m", [1.0]], kwargs, {}, float(i), expires)


def test_priority_means_what_the_broker_says() -> None:
    reqs = [_req(0, priority=1), _req(1, priority=9), _req(2)]
    for r in reqs:
        deadlines.stamp(r, broker_is_redis=False)
    assert [r.id for r in deadlines.order(reqs)] == ["1", "0", "2"]  # RabbitMQ: higher first
    for r in reqs:
        deadlines.stamp(r, broker_is_redis=True)
    assert [r.id for r in deadlines.order(reqs)] == ["2", "0", "1"]  # kombu's Redis: lower first


def test_earlier_deadline_first_and_expires_counts() -> None:
    now_ms = int(time.time() * 1000)
    late, soon = _req(0, deadline_ms=now_ms + 60_000), _req(1, expires=datetime.now(UTC) + timedelta(seconds=5))
    plain = _req(2)
    assert deadlines.stamp(late, broker_is_redis=True) and deadlines.stamp(soon, broker_is_redis=True)
    assert not deadlines.stamp(plain, broker_is_redis=True)
    assert [r.id for r in deadlines.order([plain, late, soon])] == ["1", "0", "2"]


def test_drop_late_revokes_past_and_unmeetable_deadlines() -> None:
    now_ms = int(time.time() * 1000)
    reqs = [
        _req(0, deadline_ms=now_ms - 1),
        _req(1, deadline_ms=now_ms + 500),
        _req(2),
        _req(3, deadline_ms=now_ms + 60_000),
    ]
    for r in reqs:
        deadlines.stamp(r, broker_is_redis=True)
    kept, revoked = deadlines.drop_late([(r, None) for r in reqs], chunk=64, cost=1.0)
    assert [r.id for r, _ in kept] == ["2", "3"]
    assert [o.request.id for o in revoked] == ["0", "1"]
    assert "passed" in str(revoked[0].result) and "cannot be met" in str(revoked[1].result)


def test_shed_drops_the_expired_first_then_the_least_urgent() -> None:
    now_ms = int(time.time() * 1000)
    pending = [_req(0, deadline_ms=now_ms - 1), _req(1, priority=5), _req(2, priority=1)]
    for r in pending:
        deadlines.stamp(r, broker_is_redis=True)
    incoming = _req(3, priority=0)
    deadlines.stamp(incoming, broker_is_redis=True)
    kept, outcomes, admitted = deadlines.shed(pending, incoming, limit=2)
    assert admitted and [r.id for r in kept] == ["2"]
    assert [o.request.id for o in outcomes] == ["0", "1"]
    worst = _req(4, priority=9)
    deadlines.stamp(worst, broker_is_redis=True)
    kept, outcomes, admitted = deadlines.shed([pending[2], incoming], worst, limit=2)
    assert not admitted and [o.request.id for o in outcomes] == ["4"]


def test_cost_estimate_learns_in_fixed_mode_too() -> None:
    policy = BatchPolicy(BatchSettings())
    assert policy.estimate(8) == 0.0
    policy.observe(4, 0.4)
    assert abs(policy.estimate(8) - 0.8) < 1e-9
    assert policy.max_batch_size == BatchSettings().max_batch_size  # fixed mode keeps its size


def test_identical_inputs_share_a_row_and_the_cache_is_an_lru() -> None:
    a, b = np.array([1.0, 2.0], np.float32), np.array([2.0, 1.0], np.float32)
    reqs = [_req(i) for i in range(3)]
    for keyed in (False, True):
        rows = distinct([(reqs[0], a), (reqs[1], b), (reqs[2], a.copy())], keyed=keyed)
        assert [[r.id for r in row.requests] for row in rows] == [["0", "2"], ["1"]]
    cache = ResultCache(2)
    cache.put(("m", "e", 0, b"a"), a)
    cache.put(("m", "e", 0, b"b"), b)
    cache.get(("m", "e", 0, b"a"))
    cache.put(("m", "e", 1, b"a"), b)
    cache.put(("m", "e", 1, b"x"), ValueError("never cached"))
    assert cache.get(("m", "e", 0, b"b")) is None and len(cache) == 2
    np.testing.assert_array_equal(cache.get(("m", "e", 0, b"a")), a)


def test_a_cached_row_owns_its_memory_and_does_not_pin_its_batch() -> None:
    batch = np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64).copy()  # 1 MiB of output, 256 bytes per row
    assert batch.base is None  # the array that owns the memory: what a view would keep alive
    alive = weakref.ref(batch)
    cache = ResultCache(8)
    for i, row in enumerate(list(batch)[:3]):  # rows as the engine returns them: views of the batch
        cache.put(("m", "e", 0, bytes([i])), row)
    del batch, row
    gc.collect()
    assert alive() is None, "a cached row keeps its whole batch alive"
    held = [cache.get(("m", "e", 0, bytes([i]))) for i in range(3)]
    assert all(h is not None and h.base is None and h.nbytes == 256 for h in held)
    np.testing.assert_array_equal(held[2], np.arange(128, 192, dtype=np.float32))


def test_snapshot_cache_is_capped_by_bytes() -> None:
    cache = SnapshotCache(max_bytes=3000)
    for name in ("a", "b", "c"):
        cache.remember(Snapshot(name, 0, "e", {"p.w": torch.zeros(250)}))  # 1000 bytes each
    cache.get("a")
    cache.remember(Snapshot("d", 0, "e", {"p.w": torch.zeros(250)}))
    assert cache.get("b") is None and all(cache.get(n) is not None for n in "acd")
    assert cache.nbytes == 3000


def test_cost_model_is_a_lower_bound_learned_after_the_first_batch() -> None:
    costs = deadlines.CostModels()
    costs.observe("m", 64, 5.0)  # the first batch (warm-up) is not counted
    assert costs.predicted("m", 64) == 0.0
    costs.observe("m", 64, 0.064)  # 1 ms per request at 64
    costs.observe("m", 8, 0.016)  # 2 ms per request at 8
    assert abs(costs.predicted("m", 64) - 0.064) < 1e-12
    assert abs(costs.predicted("m", 32) - 0.032) < 1e-12  # 32 x the per-request cost of the larger batch
    assert abs(costs.predicted("m", 128) - 0.064) < 1e-12  # never extrapolated above what a smaller batch cost
    assert abs(costs.predicted("m", 4) - 0.004) < 1e-12
    assert costs.predicted("other", 4) == 0.0 and costs.floor() == costs.predicted("m", 1)


def test_too_late_on_arrival_counts_the_more_urgent_requests_ahead() -> None:
    costs = deadlines.CostModels()
    for _ in range(2):
        costs.observe("m", 32, 0.32)  # 10 ms per request
    now_ms = int(time.time() * 1000)
    ahead = [_req(i, priority=0, deadline_ms=now_ms + 60_000) for i in range(20)]
    for r in ahead:
        deadlines.stamp(r, broker_is_redis=True)
    urgent, behind = _req(30, priority=0, deadline_ms=now_ms + 100), _req(31, priority=9, deadline_ms=now_ms + 150)
    for r in (urgent, behind):
        deadlines.stamp(r, broker_is_redis=True)
    # the urgent one (earliest deadline, top priority) has nobody ahead: 10 ms fits in 100 ms
    assert deadlines.too_late(urgent, time.time(), costs.ahead(urgent, ahead)) is None
    # behind 20 more urgent requests it needs >= 210 ms: revoked on arrival, saying why
    late = deadlines.too_late(behind, time.time(), costs.ahead(behind, ahead))
    assert late is not None and "cannot be met" in str(late.result)
    passed = _req(32, deadline_ms=now_ms - 1)
    deadlines.stamp(passed, broker_is_redis=True)
    assert "passed" in str(deadlines.too_late(passed, time.time(), 0.0).result)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_slow_batch_cannot_capture_the_cost_model() -> None:
    clock = _Clock()
    costs = deadlines.CostModels(clock=clock)
    costs.observe("m", 1, 0.5)  # warm-up, left out
    costs.observe("m", 1, 0.001)
    costs.observe("m", 1, 2.0)  # one slow batch (a GC pause)
    assert costs.predicted("m", 1) == 0.001  # the lower median of the same size's samples
    assert costs.predicted("m", 4) == 0.001  # never more than the smaller batches' statistic
    costs.observe("m", 2, 2.0)  # the only sample of its size: it counts, until it ages out
    assert costs.predicted("m", 2) == 2.0
    clock.now += deadlines.CostModels.MAX_AGE_S + 1
    assert costs.predicted("m", 2) == 0.0 and costs.floor() == 0.0


def test_a_model_revoked_on_prediction_alone_is_probed_now_and_then() -> None:
    clock = _Clock()
    costs = deadlines.CostModels(clock=clock)
    assert not costs.probe(None)
    costs.observe("m", 1, 0.5)
    costs.observe("m", 1, 2.0)
    assert not costs.probe("m")  # its newest sample is fresh
    clock.now += deadlines.CostModels.PROBE_AFTER_S
    assert costs.probe("m") and not costs.probe("m")  # one probe, then none until PROBE_AFTER_S later
    clock.now += deadlines.CostModels.PROBE_AFTER_S
    assert costs.probe("m")
