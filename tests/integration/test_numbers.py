"""Numbers past every range (issue 18, findings 1 and 3, lesser items): one checked conversion per field, on both
brokers, and a message parses the same way whatever else it holds."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from celery.result import AsyncResult

from agent_workers.errors import InputError
from agent_workers.models import make_spec
from tests.conftest import Pool, reference, unique
from tests.integration.test_envelope import Text, _headers, publish_raw

pytestmark = pytest.mark.integration

HUGE = "1" + "0" * 400  # 10**400 as a JSON literal: orjson refuses it, the standard library reads an exact int
#: (field the error names, the call as JSON text with ``M`` for the model name); every one fails alone.
CASES = {
    "deadline-ms-10-pow-400": ("deadline_ms", '[["M", [1.0, 2.0]], {"deadline_ms": ' + HUGE + "}, {}]"),
    "deadline-ms-1e400": ("deadline_ms", '[["M", [1.0, 2.0]], {"deadline_ms": 1e400}, {}]'),
    "deadline-ms-in-year-40000": ("deadline_ms", '[["M", [1.0, 2.0]], {"deadline_ms": 1200000000000000}, {}]'),
    "version-1e400": ("version", '[["M", [1.0, 2.0], 1e400], {}, {}]'),
    "min-version-past-64-bits": ("min_version", '[["M", [1.0, 2.0], null, 18446744073709551616], {}, {}]'),
    # The same number where a NaN literal sends the body to the standard library's parser: the same answer.
    "min-version-past-64-bits-fallback": ("min_version", '[["M", [NaN, 2.0], null, 18446744073709551616], {}, {}]'),
    "inputs-10-pow-400": ("inputs", '[["M", [' + HUGE + ", 2.0]], {}, {}]"),
    "inputs-past-float32": ("inputs", '[["M", [1e39, 2.0]], {}, {}]'),
    "inputs-mixed-ints": ("inputs", '[["M", [1, 1' + "0" * 39 + "]], {}, {}]"),  # 1e39: an int past float32
}


def good_and_bad(model: str, bad: dict[str, str]) -> tuple[list[tuple[dict[str, object], object]], list[str]]:
    """Good requests around the bad ones, in one burst: the good ids, and the messages."""
    good = [f"good-{uuid.uuid4().hex}" for _ in range(4)]
    messages: list[tuple[dict[str, object], object]] = [
        (_headers(g), [[model, [float(i), 1.0]], {}, {}]) for i, g in enumerate(good)
    ]
    for task_id, text in bad.items():
        messages.insert(2, (_headers(task_id), Text(text.replace('"M"', f'"{model}"'))))
    return messages, good


def test_numbers_past_every_range_fail_only_their_own_request(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    pid = pool.worker.pid
    bad = {f"bad-{case}-{uuid.uuid4().hex[:8]}": CASES[case] for case in CASES}
    messages, good = good_and_bad(model, {task_id: text for task_id, (_, text) in bad.items()})
    publish_raw(pool, messages)
    outputs = [pool.client.wait(g, 30)["outputs"] for g in good]
    rows = np.array([[float(i), 1.0] for i in range(len(good))])
    np.testing.assert_allclose(outputs, reference(pool, model, rows), rtol=1e-5, atol=1e-6)
    for task_id, (field, _) in bad.items():
        with pytest.raises(InputError, match=field):
            pool.client.wait(task_id, 30)
            pytest.fail(f"{task_id} was served")
    assert pool.worker.pid == pid and pool.worker.proc is not None and pool.worker.proc.poll() is None


#: train_step calls (``M`` the model) with a number past its range, and the words the error names it by.
TRAIN_CASES = {
    "y-1e400": ("x or y", '[["M"], {"x": [[1.0]], "y": [[1e400]]}, {}]'),
    "x-10-pow-400": ("x or y", '[["M"], {"x": [[' + HUGE + ']], "y": [[1.0]]}, {}]'),
    "lr-10-pow-400": ("lr", '[["M"], {"x": [[1.0]], "y": [[1.0]], "hparams": {"lr": ' + HUGE + "}}, {}]"),
    "momentum-1e400": ("momentum", '[["M"], {"x": [[1.0]], "y": [[1.0]], "hparams": {"momentum": 1e400}}, {}]'),
    "betas-1e400": ("betas", '[["M"], {"x": [[1.0]], "y": [[1.0]], "hparams": {"betas": [1e400, 0.9]}}, {}]'),
}


def test_train_step_numbers_past_every_range_fail_only_their_own_step(pool: Pool) -> None:
    model = unique("ctr")
    pool.store.create(model, make_spec("linear", in_features=1))
    bad = {f"bad-{case}-{uuid.uuid4().hex[:8]}": TRAIN_CASES[case] for case in TRAIN_CASES}
    good = f"good-{uuid.uuid4().hex}"
    messages: list[tuple[dict[str, object], object]] = [
        (_headers(task_id, task="agent_workers.train_step"), Text(text.replace('"M"', f'"{model}"')))
        for task_id, (_, text) in bad.items()
    ]
    messages.append((_headers(good, task="agent_workers.train_step"), [[model], {"x": [[1.0]], "y": [[2.0]]}, {}]))
    publish_raw(pool, messages, queue=pool.settings.training_queue)
    for task_id, (field, _) in bad.items():
        with pytest.raises(InputError, match=field):
            pool.client.wait(task_id, 60)
            pytest.fail(f"{task_id} was applied")
    assert pool.client.wait(good, 60)["version"] == 1


def test_unservable_messages_never_leak_a_prefetch_slot(broker: str, start_pool) -> None:
    # Prefetch 4: before the fix, each of these stopped a RabbitMQ worker, or on Redis held a slot for ever.
    pool: Pool = start_pool(broker, queues="inference", max_batch_size=2, max_wait_ms=20)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    bad = {f"bad-{i}-{uuid.uuid4().hex[:8]}": CASES["deadline-ms-10-pow-400"][1] for i in range(12)}
    messages, good = good_and_bad(model, bad)
    publish_raw(pool, messages)
    for task_id in bad:
        with pytest.raises(InputError, match="deadline_ms"):
            pool.client.wait(task_id, 30)
    assert [pool.client.wait(g, 30)["version"] for g in good] == [0] * len(good)
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0, "the worker stopped consuming"


def test_deadline_ms_given_in_seconds_is_revoked_naming_the_unit(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    seconds = int(time.time()) + 60
    handle = pool.client.app.send_task(
        "agent_workers.predict", args=[model, [1.0, 2.0]], kwargs={"deadline_ms": seconds}
    )
    result = AsyncResult(handle.id, app=pool.client.app)
    result.get(timeout=30, propagate=False)
    assert result.state == "REVOKED"
    assert "looks like unix seconds" in str(result.result) and "milliseconds" in str(result.result)
