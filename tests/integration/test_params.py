"""The parameter store against a real Redis: commit outcomes, retention, pinned reads, rollback, GC, chunking,
the reader cache, lock mode and the durability check. No workers here; see test_training.py for those."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

import tests.plugins  # noqa: F401 - registers the counter architecture
from agent_workers.config import Settings
from agent_workers.errors import ConfigError, ModelError, StoreError
from agent_workers.keys import Keys
from agent_workers.models import make_spec
from agent_workers.store.params import (
    PARAM_PREFIX,
    STAGING_TTL,
    CommitOutcome,
    RedisParamStore,
    blob_metadata,
    chunk_keys,
)
from agent_workers.worker.decoding import Decoder
from agent_workers.worker.inference import InferenceEngine
from agent_workers.worker.requests import Pending
from tests.conftest import PARAMS_URL

pytestmark = pytest.mark.integration

COUNTER = make_spec("counter", in_features=1, size=4)


@pytest.fixture
def make_store(redis_up: None) -> Iterator[Callable[..., RedisParamStore]]:
    """Factory of stores on one fresh namespace (deleted afterwards); each call is a separate client/cache."""
    namespace = "tp" + uuid.uuid4().hex[:10]
    client = redis.Redis.from_url(PARAMS_URL)

    def make(**options: object) -> RedisParamStore:
        return RedisParamStore(client=redis.Redis.from_url(PARAMS_URL), keys=Keys(namespace), **options)

    yield make
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


def values(value: float, size: int = 4) -> dict[str, torch.Tensor]:
    return {PARAM_PREFIX + "value": torch.full((size,), float(value))}


def counter_value(store: RedisParamStore, name: str, version: int | None = None) -> float:
    return float(store.read(name, version).parameters()["value"][0])


def test_commit_outcomes_committed_conflict_duplicate(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    store.create("m", COUNTER)
    epoch = store.head("m").epoch
    won = store.commit("m", expected=0, tensors=values(1), update_id="a", epoch=epoch)
    assert (won.outcome, won.version) == (CommitOutcome.COMMITTED, 1)
    head = store.head("m")
    assert head.version == 1
    lost = store.commit("m", expected=0, tensors=values(99), update_id="b", epoch=epoch)
    assert (lost.outcome, lost.version) == (CommitOutcome.CONFLICT, 1)
    again = store.commit("m", expected=1, tensors=values(99), update_id="a", epoch=epoch)
    assert (again.outcome, again.version) == (CommitOutcome.DUPLICATE, 1)
    assert store.head("m").version == 1 and counter_value(make_store(), "m") == 1.0
    assert store.applied("m", "a") == 1 and store.applied("m", "b") is None
    # Losers leave no staging behind: the script deletes it on conflict and duplicate.
    assert not list(store.client.scan_iter(match=store.keys.staging("m", "") + "*"))


def test_the_dedup_window_counts_update_ids_not_versions(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(dedup_window=6)
    store.create("m", COUNTER)
    epoch = store.head("m").epoch
    groups = [[f"g{v}:{i}" for i in range(4)] for v in range(5)]  # group commits: 4 update ids per version
    for v, ids in enumerate(groups):
        won = store.commit("m", expected=v, tensors=values(v + 1), update_id=ids[0], more_ids=ids[1:], epoch=epoch)
        assert won.outcome is CommitOutcome.COMMITTED
    # At most the window's ids are kept (trimming by version kept 6 versions x 4 ids), and they are the newest.
    assert store.client.zcard(store.keys.applied("m")) == 6
    assert all(v == 5 for v in store.applied_many("m", groups[-1]))
    assert store.applied_many("m", groups[0]) == [None] * 4
    # Within the window, a redelivered step is still a duplicate that changes nothing.
    again = store.commit("m", expected=5, tensors=values(99), update_id=groups[-1][2], epoch=epoch)
    assert (again.outcome, again.version) == (CommitOutcome.DUPLICATE, 5)
    assert store.head("m").version == 5 and counter_value(make_store(), "m") == 5.0


def test_commit_to_unknown_or_recreated_model_is_refused(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    with pytest.raises(ModelError, match="unknown model"):
        store.commit("ghost", expected=0, tensors=values(1))
    store.create("m", COUNTER)
    old_epoch = store.head("m").epoch
    store.create("m", COUNTER, replace=True)
    with pytest.raises(ModelError, match="recreated"):
        store.commit("m", expected=0, tensors=values(1), epoch=old_epoch)
    assert store.head("m").version == 0


def test_last_k_versions_stay_readable_and_older_ones_are_collected(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(keep_versions=3)
    store.create("m", COUNTER)
    epoch = store.head("m").epoch
    for v in range(6):
        assert store.commit("m", expected=v, tensors=values(v + 1), epoch=epoch).outcome is CommitOutcome.COMMITTED
    reader = make_store(keep_versions=3, cache=False)
    assert [counter_value(reader, "m", v) for v in (4, 5, 6)] == [4.0, 5.0, 6.0]
    for v in (0, 1, 2, 3):
        with pytest.raises(ModelError, match="no longer kept"):
            reader.read("m", v)
    blobs = sorted(k.decode() for k in store.client.scan_iter(match=store.keys.blob_prefix("m") + "*"))
    assert blobs == [store.keys.blob("m", v) for v in (4, 5, 6)]
    with pytest.raises(ModelError, match="no version 7"):
        reader.read("m", 7)


def test_pinned_read_returns_that_version_and_its_header_agrees(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    store.create("m", COUNTER)
    epoch = store.head("m").epoch
    for v in range(3):
        store.commit("m", expected=v, tensors=values(10 * (v + 1)), epoch=epoch)
    snap = make_store(cache=False).read("m", 2)
    assert snap.version == 2 and snap.meta["version"] == "2" and snap.meta["epoch"] == epoch
    assert float(snap.parameters()["value"][0]) == 20.0


def test_rollback_is_a_new_version_with_the_old_parameters_and_a_barrier(
    make_store: Callable[..., RedisParamStore],
) -> None:
    store = make_store(keep_versions=3)
    store.create("m", COUNTER)
    epoch = store.head("m").epoch
    for v in range(4):
        store.commit("m", expected=v, tensors=values(v + 1), epoch=epoch)
    new = store.rollback("m", 2)
    assert new == 5
    head = store.head("m")
    assert head.version == 5 and head.barrier == 5
    fresh = make_store(cache=False)
    snap = fresh.read("m")
    assert snap.meta["version"] == "5" and float(snap.parameters()["value"][0]) == 2.0
    assert store.history("m", 1)[0]["kind"] == "rollback" and store.history("m", 1)[0]["to"] == 2
    # Retention still counts the rollback as a version: 2 left the window, so rolling back to it now fails,
    # but the version restored from it lives on.
    with pytest.raises(ModelError, match="no longer kept"):
        store.rollback("m", 2)
    assert float(fresh.read("m", 5).parameters()["value"][0]) == 2.0
    # An update id makes a repeated rollback a no-op.
    assert store.rollback("m", 4, update_id="r1") == 6
    assert store.rollback("m", 3, update_id="r1") == 6
    assert store.head("m").version == 6


def test_gc_sweeps_what_commits_left_behind(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(keep_versions=10)
    store.create("m", COUNTER)
    epoch = store.head("m").epoch
    for v in range(5):
        store.commit("m", expected=v, tensors=values(v), epoch=epoch)
    stray = store.keys.staging("m", "left-over")
    store.client.set(stray, b"x")  # a staging key without expiry (should not exist, but must not live forever)
    narrow = make_store(keep_versions=2)  # an operator lowered keep_versions
    assert narrow.gc("m") == 4  # versions 0..3
    assert 0 < store.client.ttl(stray) <= STAGING_TTL
    assert narrow.read("m", 4).version == 4 and narrow.read("m", 5).version == 5
    with pytest.raises(ModelError, match="no longer kept"):
        narrow.read("m", 3)
    assert narrow.gc("m") == 0


def test_large_blobs_are_chunked_and_read_back_whole(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(chunk_bytes=1024, keep_versions=2)
    spec = make_spec("counter", in_features=1, size=1000)  # 4,000 bytes of floats: 4-5 chunks
    store.create("big", spec)
    head = store.head("big")
    assert head.chunks >= 4
    for v in range(3):
        tensors = {PARAM_PREFIX + "value": torch.arange(1000, dtype=torch.float32) + v}
        assert store.commit("big", expected=v, tensors=tensors, epoch=head.epoch).outcome is CommitOutcome.COMMITTED
    reader = make_store(chunk_bytes=1024, cache=False)
    torch.testing.assert_close(reader.read("big").parameters()["value"], torch.arange(1000.0) + 2)
    torch.testing.assert_close(reader.read("big", 2).parameters()["value"], torch.arange(1000.0) + 1)
    # Every chunk of the collected versions is gone, the kept ones are whole.
    n = store.head("big").chunks
    client = store.client
    assert all(client.exists(k) for v in (2, 3) for k in chunk_keys(store.keys.blob("big", v), n))
    assert not any(client.exists(k) for v in (0, 1) for k in chunk_keys(store.keys.blob("big", v), n))
    # A reader with the default chunk size reads chunked blobs too: the layout is recorded, not configured.
    assert make_store(cache=False).read("big").version == 3


def test_a_missing_staged_chunk_fails_the_whole_commit(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(chunk_bytes=1024)
    store.create("big", make_spec("counter", in_features=1, size=1000))
    epoch = store.head("big").epoch
    original = store._cas

    def evict_one_chunk(*, keys: list[str], args: list[object]) -> list[object]:
        store.client.delete(keys[4])  # the second staged chunk, as if Redis evicted it
        return original(keys=keys, args=args)

    store._cas = evict_one_chunk  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="vanished"):
        store.commit("big", expected=0, tensors={PARAM_PREFIX + "value": torch.ones(1000)}, epoch=epoch)
    assert store.head("big").version == 0
    assert not list(store.client.scan_iter(match=store.keys.blob("big", 1) + "*"))


def test_reader_downloads_the_blob_only_when_the_version_changed(
    make_store: Callable[..., RedisParamStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_store()
    writer.create("m", COUNTER)
    epoch = writer.head("m").epoch
    reader = make_store()
    fetched: list[str] = []
    original = reader._fetch
    monkeypatch.setattr(reader, "_fetch", lambda first, n: fetched.append(first) or original(first, n))
    first = reader.read("m")
    assert reader.read("m") is first and len(fetched) == 1
    writer.commit("m", expected=0, tensors=values(7), epoch=epoch)
    assert counter_value(reader, "m") == 7.0 and len(fetched) == 2
    assert counter_value(reader, "m") == 7.0 and len(fetched) == 2
    # The writer's own commit primed its cache: no download for it at all.
    monkeypatch.setattr(writer, "_fetch", lambda first, n: pytest.fail("writer downloaded its own commit"))
    assert counter_value(writer, "m") == 7.0


def test_concurrent_committers_lose_no_update(make_store: Callable[..., RedisParamStore]) -> None:
    """Threads with their own clients, each adding 1 twenty times through compare-and-set retries."""
    setup = make_store()
    setup.create("m", make_spec("counter", in_features=1, size=1))
    errors: list[BaseException] = []

    def trainer(index: int) -> None:
        store = make_store()
        try:
            for i in range(20):
                while True:
                    snap = store.read("m")
                    new = {PARAM_PREFIX + "value": snap.tensors[PARAM_PREFIX + "value"] + 1}
                    result = store.commit(
                        "m", expected=snap.version, tensors=new, update_id=f"{index}:{i}", epoch=snap.epoch
                    )
                    if result.outcome is not CommitOutcome.CONFLICT:
                        break
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=trainer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert setup.head("m").version == 80
    assert float(make_store(cache=False).read("m").parameters()["value"][0]) == 80.0
    versions = [r["version"] for r in reversed(setup.history("m", 100))]
    assert versions == list(range(81))


def test_lock_mode_serialises_holders(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(mode="lock", lock_timeout=5)
    store.create("m", COUNTER)
    inside: list[int] = []
    overlaps: list[int] = []

    def holder(index: int) -> None:
        own = make_store(mode="lock", lock_timeout=5)
        for _ in range(5):
            with own.exclusive("m"):
                inside.append(index)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                snap = own.read("m")
                new = {PARAM_PREFIX + "value": snap.tensors[PARAM_PREFIX + "value"] + 1}
                assert own.commit("m", expected=snap.version, tensors=new, epoch=snap.epoch).outcome is (
                    CommitOutcome.COMMITTED
                )
                inside.remove(index)

    threads = [threading.Thread(target=holder, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert store.head("m").version == 15 and counter_value(make_store(cache=False), "m") == 15.0


def test_optimistic_mode_takes_no_lock(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    store.create("m", COUNTER)
    with store.exclusive("m"), make_store().exclusive("m"):
        assert not store.client.exists(store.keys.lock("m"))


def test_wait_aof_on_redis_older_than_7_2_is_a_config_error_naming_the_version(redis_up: None) -> None:
    client = redis.Redis.from_url(PARAMS_URL)
    version = client.info("server")["redis_version"]
    if tuple(int(p) for p in str(version).split(".")[:2]) >= (7, 2):
        pytest.skip(f"this Redis is {version}, which has WAITAOF")
    with pytest.raises(ConfigError, match=rf"7\.2.*{version}"):
        RedisParamStore(client=client, keys=Keys("tw"), wait_aof=True)


def test_model_names_that_would_glob_other_models_are_refused(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    for bad in ("a*", "a?", "a[b]", "a:b", "a{b}", "a b", ""):
        with pytest.raises(ModelError, match="model name"):
            store.create(bad, COUNTER)


def test_blob_header_carries_model_version_and_epoch(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    store.create("m", COUNTER)
    head = store.head("m")
    store.commit("m", expected=0, tensors=values(3), epoch=head.epoch)
    raw = store.client.get(store.keys.blob("m", 1))
    assert blob_metadata(raw) == {"model": "m", "version": "1", "epoch": head.epoch}


def test_inference_reads_skip_the_optimizer_state_and_trainers_get_it_back(
    make_store: Callable[..., RedisParamStore],
) -> None:
    store = make_store(chunk_bytes=1024)
    store.create("m", make_spec("linear", in_features=300))
    head = store.head("m")
    assert head.chunks == head.param_chunks  # no optimizer state yet
    snap = store.read("m")
    state = {"o.adam.m.weight": torch.full((1, 300), 0.5), "o.adam.step": torch.tensor([1.0], dtype=torch.float64)}
    store.commit("m", expected=0, tensors={**snap.tensors, **state}, epoch=head.epoch, update_id="s1")
    head = store.head("m")
    assert head.chunks > head.param_chunks >= 2  # parameters and state chunked apart

    inference = make_store(chunk_bytes=1024)
    fetched: list[int] = []
    original = inference._fetch
    inference._fetch = lambda first, n: fetched.append(n) or original(first, n)  # type: ignore[method-assign]
    params_only = inference.read("m", state=False)
    assert fetched == [head.param_chunks] and not params_only.complete
    assert set(params_only.tensors) == set(snap.tensors)
    full = inference.read("m")  # a trainer in the same process: the cached parameters-only snapshot is not enough
    assert fetched == [head.param_chunks, head.chunks] and full.complete
    assert torch.equal(full.tensors["o.adam.m.weight"], state["o.adam.m.weight"])
    assert torch.equal(full.parameters()["weight"], snap.parameters()["weight"])
    assert inference.read("m", state=False) is full  # a complete snapshot serves parameters-only reads too

    pinned = make_store(chunk_bytes=1024).read("m", 1)
    assert pinned.complete and "o.adam.step" in pinned.tensors


def test_collecting_a_version_removes_its_state_chunks_too(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(chunk_bytes=1024, keep_versions=2)
    store.create("m", make_spec("linear", in_features=300))
    epoch = store.head("m").epoch
    tensors = dict(store.read("m").tensors)
    for v in range(3):
        tensors["o.sgd.buf.weight"] = torch.full((1, 300), float(v))
        assert store.commit("m", expected=v, tensors=tensors, epoch=epoch).outcome is CommitOutcome.COMMITTED
    head = store.head("m")
    first_of_v1 = store.keys.blob("m", 1)
    assert not store.client.exists(*chunk_keys(first_of_v1, head.chunks))
    assert store.client.hget(store.keys.head("m"), "pchunks:1") is None
    assert store.client.hget(store.keys.head("m"), "pchunks:3") is not None
    assert float(store.read("m", 2).tensors["o.sgd.buf.weight"][0, 0]) == 1.0


def test_names_with_control_characters_or_too_long_are_refused(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    for bad in ("a\x1b[2Jb", "a\rb", "a\tb", "x" * 201, "a\u200bb"):
        with pytest.raises(ModelError, match="model name"):
            store.create(bad, COUNTER)
    store.create("x" * 200, COUNTER)  # the longest name allowed


def test_a_missing_blob_under_a_still_head_is_named_with_its_key_and_the_fix(
    make_store: Callable[..., RedisParamStore],
) -> None:
    store = make_store()
    store.create("m", COUNTER)
    store.commit("m", expected=0, tensors=values(1), epoch=store.head("m").epoch)
    key = store.keys.blob("m", 1)
    store.client.delete(key)  # evicted, or deleted by hand
    with pytest.raises(StoreError) as info:
        make_store().read("m")
    message = str(info.value)
    assert key in message and "missing" in message and "models rollback m" in message
    assert "too fast" not in message
    store.rollback("m", 0)  # the fix the message names works
    assert counter_value(make_store(), "m") == 0.0


def test_a_foreign_blob_under_a_still_head_is_named_as_such(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store()
    store.create("m", COUNTER)
    store.create("other", COUNTER)
    store.commit("m", expected=0, tensors=values(1), epoch=store.head("m").epoch)
    # Someone copied another model's blob over m's current one.
    store.client.set(store.keys.blob("m", 1), store.client.get(store.keys.blob("other", 0)))
    with pytest.raises(StoreError) as info:
        make_store().read("m")
    message = str(info.value)
    assert "belongs to model 'other' version 0" in message and store.keys.blob("m", 1) in message
    assert "models rollback" in message and "too fast" not in message


def test_artifact_sets_no_kept_version_reads_are_deleted(make_store: Callable[..., RedisParamStore]) -> None:
    store = make_store(keep_versions=2)
    store.create("m", COUNTER, artifacts={"labels": '["a"]'})
    epoch = store.head("m").epoch
    owners = store.keys.artifact_versions("m")
    for v in range(4):  # a new set for every version: 1, 2, 3, 4
        assert store.artifacts.put("m", {"labels": f'["v{v + 1}"]'}) == v + 1
        store.commit("m", expected=v, tensors=values(v), epoch=epoch)
    # each put pruned what the head of its time no longer read (sets 0 and 1); the last commit made set 2 stale too
    assert [int(v) for v in store.client.zrange(owners, 0, -1)] == [2, 3, 4]
    assert not any(store.client.exists(store.keys.artifacts("m", v)) for v in (0, 1))
    assert store.gc("m") == 1  # head 4 keeps versions 3 and 4, which read the sets of 3 and 4
    assert [int(v) for v in store.client.zrange(owners, 0, -1)] == [3, 4]
    assert not store.client.exists(store.keys.artifacts("m", 2))
    assert store.artifacts.get("m", 3).labels == ["v3"] and store.artifacts.get("m", 4).labels == ["v4"]
    # a set that still holds for a kept version stays, however old: versions 5 and 6 commit without new sets
    for v in (4, 5):
        store.commit("m", expected=v, tensors=values(v), epoch=epoch)
    assert store.gc("m") == 1  # the set of 3: versions 5 and 6 read the set of 4
    assert [int(v) for v in store.client.zrange(owners, 0, -1)] == [4]
    assert store.artifacts.get("m", 5).labels == ["v4"] == store.artifacts.get("m", 6).labels
    assert store.gc("m") == 0


def test_a_batch_decoded_ahead_is_served_by_the_head_read_after_its_requests_arrived(
    make_store: Callable[..., RedisParamStore],
) -> None:
    """The decode-ahead thread reads the head for its batch (worker/decoding.py): a version committed after the
    worker loaded the one before, and before the batch was flushed, serves it, never the version cached before."""
    store = make_store()
    store.create("m", make_spec("linear", in_features=3))
    engine = InferenceEngine(store=store, settings=Settings())
    assert engine.current("m").version == 0
    snapshot = store.read("m")
    store.commit("m", expected=0, tensors=snapshot.tensors, update_id="u1", epoch=snapshot.epoch)
    request = Pending("id", "agent_workers.predict", None, ["m", [1.0, 2.0, 3.0]], {}, {}, 0.0, None)
    decoder = Decoder(engine)
    try:
        heads = decoder.submit([request]).result(timeout=30)
    finally:
        decoder.close()
    assert heads["m"].version == 1
    assert engine.cached("m") is heads["m"]
    assert request.decoded is not None and request.decoded.spec is heads["m"].spec
