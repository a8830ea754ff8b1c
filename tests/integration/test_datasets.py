"""Training datasets against real workers (issue 22): every upload is versioned, so a re-upload or a delete is seen
by a worker that already trained on the old one; bad data is refused at upload or before fit's first commit; a
message that selects data is size-checked before anything is allocated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from agent_workers.contract import TRAIN_STEP
from agent_workers.errors import InputError
from agent_workers.keys import Keys
from agent_workers.models import make_spec
from agent_workers.training.datasets import DatasetStore, _to_bytes
from tests.conftest import REDIS, Pool, unique

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


def linear(pool: Pool, width: int = 2, out: int = 1) -> str:
    model = unique("ds")
    pool.store.create(model, make_spec("linear", in_features=width, out_features=out))
    return model


def datasets(pool: Pool) -> DatasetStore:
    return DatasetStore.from_settings(pool.settings)


def test_a_reupload_is_used_by_the_next_fit_on_the_same_worker_and_a_delete_fails_it(pool: Pool) -> None:
    model, name = linear(pool), unique("d")
    store = datasets(pool)
    store.upload(np.ones((100, 2)), np.ones((100, 1)), dataset_id=name, ttl=600)
    first = pool.client.fit(model, name, epochs=1, batch_size=10, timeout=TIMEOUT)
    assert first["steps"] == 10 and first["upload"] == store.info(name).upload
    assert pool.client.train_step(model, dataset=name, rows=[99], timeout=TIMEOUT)["version"] == 11
    # The same name, other rows: the worker holds the old upload in its cache, yet uses the new one at once.
    store.upload(np.zeros((30, 2)), np.zeros((30, 1)), dataset_id=name, ttl=600)
    second = pool.client.fit(model, name, epochs=1, batch_size=10, timeout=TIMEOUT)
    assert second["steps"] == 3 and second["upload"] == store.info(name).upload != first["upload"]
    with pytest.raises(InputError, match=r"indices in \[0, 30\)"):
        pool.client.train_step(model, dataset=name, rows=[99], timeout=TIMEOUT)
    # The model's history says which upload each step trained on.
    records = [r for r in pool.store.history(model, 100) if "upload" in r]
    assert {r["upload"] for r in records} == {first["upload"], second["upload"]}
    assert store.delete(name)
    with pytest.raises(InputError, match="does not exist"):
        pool.client.fit(model, name, epochs=1, batch_size=10, timeout=TIMEOUT)
    with pytest.raises(InputError, match="does not exist"):
        pool.client.train_step(model, dataset=name, rows=[0], timeout=TIMEOUT)
    assert pool.store.head(model).version == 14


def test_a_dataset_with_nan_or_bad_shapes_is_refused_at_upload_naming_the_row(redis_up: None) -> None:
    store = DatasetStore(client=redis.Redis.from_url(f"{REDIS}/2"), keys=Keys("tds" + unique("")[1:]))
    x = np.ones((100, 2))
    x[57, 1] = np.nan
    with pytest.raises(InputError, match=r"x row 57 holds NaN"):
        store.upload(x, np.ones(100), dataset_id="d")
    y = np.ones(100)
    y[3] = np.inf
    with pytest.raises(InputError, match=r"y row 3 holds NaN or infinity"):
        store.upload(np.ones((100, 2)), y, dataset_id="d")
    with pytest.raises(InputError, match="too large for float32"):
        store.upload(np.full((2, 2), 1e300), np.ones(2), dataset_id="d")
    with pytest.raises(InputError, match="y must hold numbers"):
        store.upload(np.ones((2, 2)), np.array(["a", "b"]), dataset_id="d")
    with pytest.raises(InputError, match="y must be one target per row"):
        store.upload(np.ones((2, 2)), np.ones((2, 1, 1)), dataset_id="d")
    for bad in ("a{b}", "a}", "a\x1bb", "a b", "", "x" * 201):
        with pytest.raises(InputError, match="dataset name"):
            store.upload(np.ones((2, 2)), np.ones(2), dataset_id=bad)
    assert store.list() == []


def test_the_dataset_cache_is_bounded_by_bytes(redis_up: None) -> None:
    client = redis.Redis.from_url(f"{REDIS}/2")
    keys = Keys("tds" + unique("")[1:])
    writer = DatasetStore(client=client, keys=keys)
    rows = 1000  # 1000 × 10 float32 = 40,000 bytes of x, 8,000 of y (float64)
    for name in ("a", "b", "c"):
        writer.upload(np.ones((rows, 10)), np.ones(rows), dataset_id=name, ttl=60)
    reader = DatasetStore(client=client, keys=keys, cache_bytes=100_000)
    for name in ("a", "b", "c"):
        reader.get(name)
    assert reader.cached_bytes == 2 * 48_000  # the least recently used was dropped
    assert DatasetStore(client=client, keys=keys, cache_bytes=0).get("a").x.shape == (rows, 10)
    writer.delete("a"), writer.delete("b"), writer.delete("c")


def test_fit_on_data_that_does_not_fit_the_model_commits_nothing(pool: Pool) -> None:
    store = datasets(pool)
    model = linear(pool)
    wide = store.upload(np.ones((40, 2)), np.ones((40, 2)), ttl=600)  # two targets per row, one output
    with pytest.raises(InputError, match="2 target"):
        pool.client.fit(model, wide, epochs=1, batch_size=10, timeout=TIMEOUT)
    narrow = store.upload(np.ones((40, 3)), np.ones((40, 1)), ttl=600)  # three features, the model takes two
    with pytest.raises(InputError, match=r"rows have shape \[3\]"):
        pool.client.fit(model, narrow, epochs=1, batch_size=10, timeout=TIMEOUT)
    classes = linear(pool, out=3)
    labels = np.zeros(40)
    labels[25] = 7  # out of range for three classes
    bad_labels = store.upload(np.ones((40, 2)), labels, ttl=600)
    with pytest.raises(InputError, match=r"y row 25 is not one class index in \[0, 3\)"):
        pool.client.fit(
            classes, bad_labels, epochs=1, batch_size=10, hparams={"loss": "cross_entropy"}, timeout=TIMEOUT
        )
    # A NaN written before uploads were checked (straight into Redis) is found before the first commit too.
    old = unique("old")
    x = np.ones((40, 2), np.float32)
    x[33, 0] = np.nan
    keys = Keys(pool.settings.namespace)
    store.client.set(keys.dataset(old, "x"), _to_bytes(x), ex=600)
    store.client.set(keys.dataset(old, "y"), _to_bytes(np.ones((40, 1))), ex=600)
    store.client.set(keys.dataset(old, "meta"), json.dumps({"rows": 40, "features": 2}), ex=600)
    with pytest.raises(InputError, match="row 33"):
        pool.client.fit(model, old, epochs=1, batch_size=10, timeout=TIMEOUT)
    assert pool.store.head(model).version == 0 and pool.store.head(classes).version == 0
    # A y of the wrong width sent inline to train_step is an InputError too, not a bare RuntimeError.
    with pytest.raises(InputError, match="does not fit the mse loss"):
        pool.client.train_step(model, x=[[0.1, 0.2]], y=[[1.0, 2.0, 3.0]], timeout=TIMEOUT)
    assert pool.store.head(model).version == 0


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_huge_rows_list_is_refused_before_allocating_and_the_worker_serves_on(pool: Pool) -> None:
    model = linear(pool, width=250)
    name = datasets(pool).upload(np.ones((4, 250)), np.ones((4, 1)), ttl=600)
    before = peak_rss_mib(pool.worker.pid)
    with pytest.raises(InputError, match="AGENT_WORKERS_MAX_INPUT_ELEMENTS"):
        pool.client.train_step(model, dataset=name, rows=[0] * 2_000_000, timeout=TIMEOUT)
    # 2,000,000 rows × 250 float32 would be 2 GB; the old worker peaked ~2 GB higher. The message itself is ~6 MB.
    assert peak_rss_mib(pool.worker.pid) - before < 500
    for bad in ("0", [[0]], ["a"], [], [10**30]):
        handle = pool.client.app.send_task(TRAIN_STEP, kwargs={"model": model, "dataset": name, "rows": bad})
        with pytest.raises(InputError, match="rows must be"):
            pool.client.wait(handle, TIMEOUT)
    assert pool.client.train_step(model, dataset=name, rows=[0, 1, 2, 3], timeout=TIMEOUT)["version"] == 1
    assert pool.client.predict(model, [0.0] * 250, timeout=TIMEOUT) is not None


def test_rows_are_size_checked_before_indexing_on_every_path(redis_up: None) -> None:
    """The per-step task and the group path both select rows through DatasetStore.rows with the element limit."""
    import tracemalloc

    store = DatasetStore(client=redis.Redis.from_url(f"{REDIS}/2"), keys=Keys("tds" + unique("")[1:]))
    name = store.upload(np.ones((4, 250)), np.ones((4, 3)), ttl=60)
    store.get(name)  # cached: what remains to allocate is the selection itself
    huge = [0] * 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="2000000 rows × 250 numbers each exceed"):
            store.rows(name, huge, max_elements=1_000_000)
        assert tracemalloc.get_traced_memory()[1] < 50 * 1024 * 1024  # the selection would be 2 GB
    finally:
        tracemalloc.stop()
    wide_y = store.upload(np.ones((4, 1)), np.ones((4, 500)), ttl=60)  # y's width counts too
    with pytest.raises(InputError, match="× 500 numbers each"):
        store.rows(wide_y, [0, 1, 2], max_elements=1000)
    x, y = store.rows(wide_y, [0, 1], max_elements=1000)
    assert x.shape == (2, 1) and y.shape == (2, 500)
    store.delete(name), store.delete(wide_y)
