"""Fuzz the dataset path (issue 22): odd names and NaN-laden arrays at upload, and hostile ``rows`` (huge lists, wrong
types, out of range) in ``train_step`` messages to a real worker on both brokers.

Properties: an upload either stores exactly what ``check_arrays`` accepts under a name ``name_problem`` accepts, or
raises an :class:`InputError`; every hostile ``rows`` message ends SUCCESS or FAILURE with an InputError, the worker
never restarts, and a good step right after still commits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from agent_workers.contract import TRAIN_STEP
from agent_workers.errors import InputError
from agent_workers.keys import Keys, name_problem
from agent_workers.models import make_spec
from agent_workers.training.datasets import DatasetStore
from tests.conftest import REDIS, Pool, unique

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
HUGE = [0] * 2_000_000  # ~6 MB of JSON: 2 GB of float32 rows on a 250-wide dataset if indexed before the check


def values() -> st.SearchStrategy[float]:
    return st.floats(allow_nan=True, allow_infinity=True, width=64) | st.integers(-(2**40), 2**40)


@pytest.fixture(scope="module")
def store(redis_up: None) -> Any:
    client = redis.Redis.from_url(f"{REDIS}/2")
    keys = Keys("tfz" + unique("")[1:])
    yield DatasetStore(client=client, keys=keys)
    found = list(client.scan_iter(match=f"{keys.namespace}:*", count=1000))
    if found:
        client.delete(*found)


@given(
    name=st.text(max_size=40) | st.sampled_from(["a{b}", "a}", "\x1b[2J", "a\rb", "x" * 201, "ok-name_1.v2"]),
    x=st.lists(st.lists(values(), min_size=2, max_size=2), min_size=1, max_size=6),
    y=st.lists(values(), min_size=1, max_size=6),
)
def test_uploads_store_checked_data_under_checked_names_or_refuse(
    store: DatasetStore, name: str, x: list[list[float]], y: list[float]
) -> None:
    try:
        stored = store.upload(x, y, dataset_id=name, ttl=60)
    except InputError:
        xa = np.asarray(x, dtype=np.float64)
        bad_data = len(x) != len(y) or not (np.isfinite(xa).all() and np.isfinite(np.asarray(y, np.float64)).all())
        with np.errstate(over="ignore"):  # too large for float32 is one of the refusals
            bad_data = bad_data or not np.isfinite(xa.astype(np.float32)).all()
        assert name_problem(name) or bad_data
        return
    assert name_problem(name) is None
    data = store.get(stored)
    assert np.isfinite(data.x).all() and np.isfinite(data.y).all() and len(data.x) == len(data.y)
    store.delete(stored)


def hostile_rows() -> st.SearchStrategy[Any]:
    ints = st.integers(-(2**70), 2**70)
    return (
        st.just(HUGE)
        | st.lists(ints, max_size=5)
        | st.lists(st.integers(0, 3), min_size=1, max_size=5)
        | st.lists(st.lists(ints, max_size=2), max_size=2)
        | st.text(max_size=10)
        | st.none()
        | st.lists(st.floats(), max_size=3)
    )


@pytest.fixture(scope="module")
def wide(pool: Pool) -> tuple[str, str]:
    model = unique("fzw")
    pool.store.create(model, make_spec("linear", in_features=250))
    dataset = DatasetStore.from_settings(pool.settings).upload(np.zeros((4, 250)), np.zeros((4, 1)), ttl=600)
    return model, dataset  # zeros: any number of steps keeps the parameters finite


@given(rows=hostile_rows())
def test_hostile_rows_fail_alone_and_the_worker_serves_on(pool: Pool, wide: tuple[str, str], rows: Any) -> None:
    model, dataset = wide
    pid = pool.worker.pid
    handle = pool.client.app.send_task(TRAIN_STEP, kwargs={"model": model, "dataset": dataset, "rows": rows})
    try:
        pool.client.wait(handle, TIMEOUT)
        assert isinstance(rows, list) and rows and all(isinstance(r, int) and 0 <= r < 4 for r in rows)
    except InputError:
        pass
    assert pool.worker.pid == pid
    good = pool.client.train_step(model, dataset=dataset, rows=[0, 1], timeout=TIMEOUT)
    assert good["version"] >= 1
