"""Training correctness with real worker processes, on both brokers and in both commit modes.

Every test trains the ``counter`` model of tests/plugins.py: one SGD step with ``lr=1`` adds its targets to the
parameter, so after any interleaving the parameter must equal the exact sum of all deltas, and the version the
number of distinct steps. A lost update, a doubled one, or a torn read shows as a wrong number.

Trainers are worker processes consuming the training queue. The ``trainers`` workers take the per-step path
(``AGENT_WORKERS_TRAIN_GROUP=1``: each train_step is a pool task); the ``grouped`` workers group-commit queued
train_step messages (worker/trainer.py), and their tests check the same invariants per update id. For the N-trainer
runs one set of workers per
(broker, mode) serves all N: two processes with four pool threads each (8 slots), and N ``fit`` jobs of K steps
each, so exactly N trainers run at once, spread over two processes (true cross-process races) while the CPU cost
stays at two interpreters with torch instead of eight. A trainer is a thread of a process here; the commit path
(store client, script, lock) is per thread and per process alike, so the interleavings are the same kind.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

import tests.plugins  # noqa: F401 - the counter architecture and loss, for create() in this process
from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.errors import ModelError
from agent_workers.keys import Keys
from agent_workers.models import make_spec
from agent_workers.store.params import STAGING_TTL, RedisParamStore
from agent_workers.tools.supervisor import WorkerProcess
from agent_workers.training.datasets import DatasetStore
from tests.conftest import Pool, pool_env, unique
from tests.plugins import PAUSE_AFTER, PAUSE_BEFORE, reached_key

pytestmark = pytest.mark.integration

COUNTER_HP = {"loss": "counter", "optimizer": "sgd", "lr": 1.0}
STEPS_PER_TRAINER = 20
GROUP = 5
RESULT_TIMEOUT = 120


@pytest.fixture(scope="module", params=["optimistic", "lock"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclasses.dataclass
class Trainers:
    """Two training worker processes (4 threads each) and the handles a test needs."""

    settings: Settings
    client: Client
    store: RedisParamStore
    datasets: DatasetStore
    workers: list[WorkerProcess]

    def counter(self, size: int = 1) -> str:
        name = unique("ctr")
        self.store.create(name, make_spec("counter", in_features=1, size=size))
        return name

    def send_fits(self, model: str, deltas: list[np.ndarray]) -> list[object]:
        """One fit job (one trainer) per delta vector, each doing one step per delta."""
        handles = []
        for d in deltas:
            dataset = self.datasets.upload(np.zeros((len(d), 1), np.float32), d.reshape(-1, 1).astype(np.float32))
            handles.append(self.client.send_fit(model, dataset, epochs=1, batch_size=1, hparams=COUNTER_HP))
        return handles


def _cleanup(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.params_url)
    keys = list(client.scan_iter(match=f"{settings.namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    if settings.broker_is_redis:
        redis.Redis.from_url(settings.broker_url).delete(settings.training_queue)


@pytest.fixture(scope="module")
def trainers(broker: str, mode: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainers]:
    # Small chunks and a short retention make every commit of the 2,048-element counter a multi-chunk commit that
    # collects an old version, so readers race both the renames and the garbage collection.
    env = pool_env(
        broker,
        plugins="tests.plugins",
        commit_mode=mode,
        keep_versions=3,
        chunk_bytes=4096,
        lock_timeout=30,
        train_group=1,
    )
    yield from _trainers(env, tmp_path_factory.mktemp(f"trainers-{broker}-{mode}"), concurrency=4)


@pytest.fixture(scope="module")
def grouped(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainers]:
    """Two worker processes on the group-commit path (groups of GROUP steps at first, adapting up to 2 × GROUP)."""
    env = pool_env(
        broker, plugins="tests.plugins", keep_versions=3, chunk_bytes=4096, train_group=GROUP, train_group_max=2 * GROUP
    )
    yield from _trainers(env, tmp_path_factory.mktemp(f"grouped-{broker}"), concurrency=1)


def _trainers(env: dict[str, str], logs: Path, *, concurrency: int) -> Iterator[Trainers]:
    settings = Settings.from_env(env)
    workers = [
        WorkerProcess(
            queues=[settings.training_queue],
            env=env,
            extra=["-c", str(concurrency)],
            log_path=logs / f"worker{i}.log",
        )
        for i in range(2)
    ]
    try:
        for w in workers:
            w.start(wait=False)
        for w in workers:
            w.wait_ready()
        store = RedisParamStore.from_settings(settings)
        yield Trainers(
            settings, Client(settings), store, DatasetStore(client=store.client, keys=Keys(settings.namespace)), workers
        )
    finally:
        for w in workers:
            w.stop()
        _cleanup(settings)


def value_of(store: RedisParamStore, model: str) -> np.ndarray:
    return store.read(model).parameters()["value"].numpy()


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_n_trainers_times_k_commits_lose_and_double_nothing(trainers: Trainers, n: int) -> None:
    model = trainers.counter()
    # Trainer j adds 100·j + 1 ... 100·j + K: distinct deltas, an exact float32 sum.
    deltas = [np.arange(1, STEPS_PER_TRAINER + 1, dtype=np.float32) + 100 * j for j in range(n)]
    results = [trainers.client.wait(h, RESULT_TIMEOUT) for h in trainers.send_fits(model, deltas)]

    assert [r["steps"] for r in results] == [STEPS_PER_TRAINER] * n
    head = trainers.store.head(model)
    assert head.version == n * STEPS_PER_TRAINER
    assert value_of(trainers.store, model).tolist() == [float(sum(d.sum() for d in deltas))]
    # The history is linear: every version exactly once, each from a distinct update.
    records = trainers.store.history(model, 1000)
    commits = [r for r in records if r["kind"] == "commit"]
    assert sorted(r["version"] for r in commits) == list(range(1, n * STEPS_PER_TRAINER + 1))
    assert len({r["update_id"] for r in commits}) == n * STEPS_PER_TRAINER
    assert all(0 <= r["staleness"] <= trainers.settings.max_staleness for r in commits)
    if trainers.settings.commit_mode == "lock":
        assert sum(r["conflicts"] for r in results) == 0  # the lock serialises; the CAS never loses
    print(
        f"\n{trainers.settings.commit_mode} n={n}: conflicts={sum(r['conflicts'] for r in results)} "
        f"recomputed={sum(r['recomputed'] for r in results)} "
        f"max staleness={max(r['max_staleness_seen'] for r in results)}"
    )


def test_the_same_step_delivered_twice_changes_the_parameters_once(trainers: Trainers) -> None:
    check_delivered_twice(trainers)


def test_the_same_step_delivered_twice_changes_the_parameters_once_when_grouped(grouped: Trainers) -> None:
    check_delivered_twice(grouped)


def check_delivered_twice(trainers: Trainers) -> None:
    model = trainers.counter()
    client = trainers.client
    twins = [
        client.send_train_step(model, x=[[0.0]], y=[[5.0]], hparams=COUNTER_HP, update_id="step-1") for _ in range(2)
    ]
    results = [client.wait(h, RESULT_TIMEOUT) for h in twins]
    assert sorted(r["duplicate"] for r in results) == [False, True]
    assert [r["version"] for r in results] == [1, 1]
    late = client.wait(
        client.send_train_step(model, x=[[0.0]], y=[[5.0]], hparams=COUNTER_HP, update_id="step-1"), RESULT_TIMEOUT
    )
    assert late["duplicate"] and late["version"] == 1
    assert trainers.store.head(model).version == 1
    assert value_of(trainers.store, model).tolist() == [5.0]


def test_a_polling_reader_never_sees_a_version_disagree_with_its_contents(trainers: Trainers) -> None:
    size, n, k = 2048, 4, 30  # 8 KiB of parameters: three 4 KiB chunks per version
    model = trainers.counter(size)
    assert trainers.store.head(model).chunks >= 2
    handles = trainers.send_fits(model, [np.ones(k, np.float32)] * n)  # every step adds 1: value == version
    latest = RedisParamStore.from_settings(trainers.settings)
    pinned = RedisParamStore.from_settings(trainers.settings, cache=False)
    seen: set[int] = set()
    collected = 0

    def check(snap_version: int, meta_version: str, value: np.ndarray) -> None:
        assert meta_version == str(snap_version)
        assert value.shape == (size,)
        assert (value == snap_version).all(), f"v{snap_version} holds {sorted(set(value.tolist()))[:5]}"

    while not all(h.ready() for h in handles):
        snap = latest.read(model)
        check(snap.version, snap.meta["version"], snap.parameters()["value"].numpy())
        seen.add(snap.version)
        if snap.version > 0:
            try:
                old = pinned.read(model, snap.version - 1)
            except ModelError:
                collected += 1  # left the 3-version window meanwhile: refused, never half-read
            else:
                check(old.version, old.meta["version"], old.parameters()["value"].numpy())
    for h in handles:
        trainers.client.wait(h, RESULT_TIMEOUT)
    final = latest.read(model)
    check(final.version, final.meta["version"], final.parameters()["value"].numpy())
    assert final.version == n * k
    assert any(0 < v < n * k for v in seen), "the reader never overlapped the training"
    print(f"\nreader saw {len(seen)} versions, {collected} pinned reads found their version collected")


@pytest.mark.parametrize("n", [2, 8])
def test_grouped_steps_from_n_producers_lose_and_double_nothing(grouped: Trainers, n: int) -> None:
    model = grouped.counter()
    client = grouped.client
    # Producer j sends K single steps adding 100·j + 1 ... 100·j + K, interleaved with the other producers, so groups
    # mix producers; every step has its own update id.
    deltas = {f"p{j}:{i}": float(100 * j + i + 1) for i in range(STEPS_PER_TRAINER) for j in range(n)}
    handles = [
        client.send_train_step(model, x=[[0.0]], y=[[d]], hparams=COUNTER_HP, update_id=u) for u, d in deltas.items()
    ]
    results = [client.wait(h, RESULT_TIMEOUT) for h in handles]

    head = grouped.store.head(model)
    assert not any(r["duplicate"] for r in results)
    assert value_of(grouped.store, model).tolist() == [sum(deltas.values())]
    # The history is linear, and every update id is in exactly one commit: the one its result names.
    records = [r for r in grouped.store.history(model, 1000) if r["kind"] == "commit"]
    assert sorted(r["version"] for r in records) == list(range(1, head.version + 1))
    ids_of = {r["version"]: r.get("update_ids") or [r["update_id"]] for r in records}
    assert sorted(u for ids in ids_of.values() for u in ids) == sorted(deltas)
    for (u, _), result in zip(deltas.items(), results, strict=True):
        assert u in ids_of[result["version"]]
    limit = grouped.settings.max_staleness
    assert all(0 <= r["staleness"] <= limit for r in results)
    assert all(0 <= r["staleness"] <= limit and r.get("steps", 1) <= 2 * GROUP for r in records)
    sizes = [len(ids) for ids in ids_of.values()]
    print(
        f"\ngrouped n={n}: {len(deltas)} steps in {head.version} commits (largest group {max(sizes)}), "
        f"conflicts={sum(r['conflicts'] for r in results)} recomputed={sum(r['recomputed'] for r in results)}"
    )


def requeue_unacked(settings: Settings, task_ids: set[str]) -> int:
    """Redis broker: put these tasks' unacknowledged messages back on their queue now.

    This is what the visibility timeout does after ``AGENT_WORKERS_VISIBILITY_TIMEOUT`` seconds (kombu's
    ``restore_visible``); doing it for exactly our messages keeps the test fast and leaves other pools' messages
    on the shared Redis alone.
    """
    from kombu import Connection

    with Connection(settings.broker_url) as conn:
        channel = conn.default_channel
        client = channel.client
        tags = [
            tag
            for tag, raw in client.hscan_iter(channel.unacked_key)
            if (json.loads(raw)[0].get("headers") or {}).get("id") in task_ids
        ]
        for tag in tags:
            channel.qos.restore_by_tag(tag, leftmost=True)
    return len(tags)


def test_a_worker_killed_mid_commit_applies_each_step_exactly_once(
    start_pool: Callable[..., Pool], broker: str, mode: str
) -> None:
    pool = start_pool(
        broker,
        queues="training",
        start=False,
        plugins="tests.plugins",
        commit_mode=mode,
        lock_timeout=2,
        train_group=1,
    )
    pool.worker.cmd += ["-c", "2"]  # two steps in flight: one paused before its CAS, one after
    pool.worker.start()
    model = unique("ctr")
    pool.store.create(model, make_spec("counter", in_features=1))
    before = pool.client.send_train_step(model, x=[[0.0]], y=[[1.0]], hparams=COUNTER_HP, update_id=PAUSE_BEFORE + "a")
    after = pool.client.send_train_step(model, x=[[0.0]], y=[[10.0]], hparams=COUNTER_HP, update_id=PAUSE_AFTER + "b")
    control = redis.Redis.from_url(pool.settings.params_url)
    paused = set()
    for _ in range(2):
        item = control.blpop([reached_key(pool.settings.namespace)], timeout=RESULT_TIMEOUT)
        assert item is not None, pool.worker.log()[-3000:]
        paused.add(item[1].decode())
        if mode == "lock":
            # A live holder renews its lock: drop it as if it had expired, so the other step gets in too (the
            # compare-and-set fences a holder whose lock is gone).
            control.delete(pool.store.keys.lock(model))
    assert paused == {PAUSE_BEFORE + "a", PAUSE_AFTER + "b"}
    # The moment of the kill: b's commit is in Redis (its ack is not), a has staged its blob but not committed.
    assert pool.store.head(model).version == 1 and value_of(pool.store, model).tolist() == [10.0]
    pool.worker.kill()
    assert pool.worker.proc is not None and pool.worker.proc.wait(30) == -9
    if pool.settings.broker_is_redis:
        assert requeue_unacked(pool.settings, {before.id, after.id}) == 2
    second = WorkerProcess(
        queues=[pool.settings.training_queue],
        env=pool.env,
        extra=["-c", "2"],
        log_path=pool.worker.log_path.with_name("second.log"),
    )
    try:
        second.start()
        redone_after = pool.client.wait(after, RESULT_TIMEOUT)
        redone_before = pool.client.wait(before, RESULT_TIMEOUT)
    finally:
        second.stop()
    assert redone_after["duplicate"] and redone_after["version"] == 1
    assert not redone_before["duplicate"] and redone_before["version"] == 2
    assert pool.store.head(model).version == 2
    assert value_of(RedisParamStore.from_settings(pool.settings, cache=False), model).tolist() == [11.0]
    # The killed step's staged blob is not a leak: it expires on its own.
    staged = list(control.scan_iter(match=pool.store.keys.staging(model, "") + "*"))
    assert all(0 < control.ttl(k) <= STAGING_TTL for k in staged)


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_worker_killed_inside_a_group_commit_applies_each_step_exactly_once(
    start_pool: Callable[..., Pool], broker: str, where: str
) -> None:
    # A group of exactly three: the worker flushes when the third message is buffered (the wait never expires).
    pool = start_pool(
        broker, queues="training", start=False, plugins="tests.plugins", train_group=3, max_wait_ms=600_000
    )
    model = unique("ctr")
    pool.store.create(model, make_spec("counter", in_features=1))
    first = (PAUSE_BEFORE if where == "before" else PAUSE_AFTER) + "a"
    steps = {first: 1.0, "b": 10.0, "c": 100.0}
    handles = [
        pool.client.send_train_step(model, x=[[0.0]], y=[[d]], hparams=COUNTER_HP, update_id=u)
        for u, d in steps.items()
    ]
    pool.worker.start()
    control = redis.Redis.from_url(pool.settings.params_url)
    item = control.blpop([reached_key(pool.settings.namespace)], timeout=RESULT_TIMEOUT)
    assert item is not None, pool.worker.log()[-3000:]
    assert item[1].decode() == first
    if where == "after":  # the group's one commit is in Redis; no result is stored and no message acknowledged
        assert pool.store.head(model).version == 1 and value_of(pool.store, model).tolist() == [111.0]
        (record,) = [r for r in pool.store.history(model) if r["kind"] == "commit"]
        assert record["update_ids"] == list(steps)
    else:
        assert pool.store.head(model).version == 0
    pool.worker.kill()
    assert pool.worker.proc is not None and pool.worker.proc.wait(30) == -9
    if pool.settings.broker_is_redis:
        assert requeue_unacked(pool.settings, {h.id for h in handles}) == 3
    second = WorkerProcess(
        queues=[pool.settings.training_queue], env=pool.env, log_path=pool.worker.log_path.with_name("second.log")
    )
    try:
        second.start()
        results = [pool.client.wait(h, RESULT_TIMEOUT) for h in handles]
    finally:
        second.stop()
    assert value_of(RedisParamStore.from_settings(pool.settings, cache=False), model).tolist() == [111.0]
    records = [r for r in pool.store.history(model) if r["kind"] == "commit"]
    assert sorted(u for r in records for u in r.get("update_ids") or [r["update_id"]]) == sorted(steps)
    if where == "after":
        assert all(r["duplicate"] and r["version"] == 1 for r in results)
        assert pool.store.head(model).version == 1
    else:
        assert not any(r["duplicate"] for r in results)
