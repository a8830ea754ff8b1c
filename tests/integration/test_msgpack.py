"""Contract 1.3 against real workers on both brokers: msgpack messages whose tensors are raw bytes (from our
Client and from a bare Celery producer's ``serializer="msgpack"``), ``output_encoding="b64"``, and msgpack decode
errors that fail their own request alone while batch-mates published in the same go succeed."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest

from agent_workers.client import Client
from agent_workers.client.deadline import Deadline
from agent_workers.contract import PREDICT
from agent_workers.errors import InputError
from agent_workers.models import make_spec
from agent_workers.tensors import decode_tensor_object
from agent_workers.wire import EMBED
from tests.conftest import Pool, unique
from tests.integration.test_contract import check
from tests.integration.test_tensors import close, local, typed_pool  # noqa: F401 - typed_pool is a fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cnn(typed_pool: Pool) -> str:  # noqa: F811 - the imported fixture
    model = unique("cnn")
    typed_pool.store.create(model, make_spec("tiny_cnn"), seed=11)
    return model


@pytest.fixture(scope="module")
def msgpack_client(typed_pool: Pool) -> Any:  # noqa: F811
    client = Client(typed_pool.settings, serializer="msgpack")
    yield client
    client.close()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)


def test_client_sends_msgpack_raw_bytes_and_outputs_match_torch(
    typed_pool: Pool,  # noqa: F811
    msgpack_client: Client,
    cnn: str,
) -> None:
    batch = images(6)
    results = msgpack_client.predict_bulk(cnn, batch)
    for image, result in zip(batch, results, strict=True):
        check(f"{PREDICT}:result", result)
        close(result["outputs"], local(typed_pool, cnn, image.tolist()))


def test_a_bare_celery_producer_sends_msgpack(typed_pool: Pool, cnn: str) -> None:  # noqa: F811
    image = images(1, seed=3)[0]
    inputs = {"dtype": "uint8", "shape": [3, 8, 8], "data": image.tobytes()}
    handle = typed_pool.client.app.send_task(
        PREDICT,
        kwargs={"model": cnn, "inputs": inputs},
        queue=typed_pool.settings.inference_queue,
        serializer="msgpack",
    )
    close(typed_pool.client.wait(handle, timeout=60)["outputs"], local(typed_pool, cnn, image.tolist()))


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_output_encoding_b64_carries_outputs_as_bytes(
    typed_pool: Pool,  # noqa: F811
    cnn: str,
    serializer: str,
) -> None:
    client = Client(typed_pool.settings, serializer=serializer)
    try:
        batch = images(4, seed=5)
        results = client.predict_bulk(cnn, batch, output_encoding="b64")
        for image, result in zip(batch, results, strict=True):
            assert isinstance(result["outputs"], np.ndarray) and result["outputs"].dtype == np.float32
            close(result["outputs"].tolist(), local(typed_pool, cnn, image.tolist()))
        stored = client.send_predict(cnn, batch[0], output_encoding="b64").get(timeout=60)  # the record as stored
        check(f"{PREDICT}:result", stored)
        assert set(stored["outputs"]) == {"dtype", "shape", "b64"} and stored["outputs"]["shape"] == [4]
        close(decode_tensor_object(stored["outputs"]).tolist(), results[0]["outputs"].tolist())  # batch of 1 vs 4
        many = client.predict_many(cnn, list(batch), output_encoding="b64")
        for got, result in zip(many["outputs"], results, strict=True):
            assert isinstance(got, np.ndarray)
            close(got.tolist(), result["outputs"].tolist())
    finally:
        client.close()


def test_named_outputs_come_as_b64_each(typed_pool: Pool, msgpack_client: Client) -> None:  # noqa: F811
    model = unique("enc")
    typed_pool.store.create(model, make_spec("two_input"), seed=1)
    inputs = {"ids": np.array([5, 6, 7], dtype=np.int64), "mask": np.array([True, True, False])}
    result = msgpack_client.predict(model, inputs, output_encoding="b64")
    assert result["outputs"]["count"].dtype == np.int64 and result["outputs"]["count"].tolist() == [2]
    plain = {k: v.tolist() for k, v in inputs.items()}
    close({k: v.tolist() for k, v in result["outputs"].items()}, local(typed_pool, model, plain))


def _body(inputs: Any, **extra: Any) -> bytes:
    return msgpack.packb([[], {"inputs": inputs, **extra}, EMBED], use_bin_type=True)


def test_msgpack_decode_errors_fail_alone_among_good_batch_mates(
    typed_pool: Pool,  # noqa: F811
    msgpack_client: Client,
    cnn: str,
) -> None:
    good = images(3, seed=9)
    raw = good[0].tobytes()

    def tensor(**over: Any) -> dict[str, Any]:
        return {"dtype": "uint8", "shape": [3, 8, 8], "data": raw, **over}

    bad = {
        "garbage": b"\xc1\x00not msgpack",  # 0xc1 is never used by msgpack
        "truncated": _body(tensor())[:-40],
        "short-data": _body(tensor(data=raw[:-1]), model=cnn),
        "data-as-text": _body(tensor(data="AAAA"), model=cnn),
        "dtype-not-taken": _body(tensor(dtype="int32"), model=cnn),
        "past-int64": _body([[[2**64 - 1] * 8] * 8] * 3, model=cnn),
        "bad-output-encoding": _body(tensor(), model=cnn, output_encoding="raw"),
        "int-keys": msgpack.packb([[], {1: 2}, EMBED]),
    }
    goods = [_body({"dtype": "uint8", "shape": [3, 8, 8], "data": g.tobytes()}, model=cnn) for g in good]
    bodies = [goods[0], *bad.values(), goods[1], goods[2]]
    items = [(str(uuid.uuid4()), body, "{}") for body in bodies]
    # one go, through the client's own msgpack envelope (a Redis push, or confirmed AMQP publishes)
    msgpack_client._publisher.publish(msgpack_client._predict, items, None, Deadline(30))
    outcomes = msgpack_client.collect([task_id for task_id, _, _ in items], timeout=60, return_exceptions=True)
    by_body = dict(zip(bodies, outcomes, strict=True))
    for image, body in zip(good, goods, strict=True):
        assert isinstance(by_body[body], dict), by_body[body]
        close(by_body[body]["outputs"], local(typed_pool, cnn, image.tolist()))
    reasons = {kind: by_body[body] for kind, body in bad.items()}
    for kind, outcome in reasons.items():
        assert isinstance(outcome, InputError), (kind, outcome)
    assert "application/x-msgpack" in str(reasons["garbage"])
    assert "take 192 bytes; data carries 191" in str(reasons["short-data"])
    assert "data must be raw bytes" in str(reasons["data-as-text"])
    assert "takes dtype uint8" in str(reasons["dtype-not-taken"])
    assert "uint8" in str(reasons["past-int64"])
    assert "output_encoding" in str(reasons["bad-output-encoding"])


def test_the_asyncio_forms_take_output_encoding_too(
    typed_pool: Pool,  # noqa: F811
    msgpack_client: Client,
    cnn: str,
) -> None:
    batch = images(3, seed=13)

    async def both() -> tuple[Any, Any]:
        one = await msgpack_client.predict_async(cnn, batch[0], output_encoding="b64")
        bulk = await msgpack_client.predict_bulk_async(cnn, batch, output_encoding="b64")
        return one, bulk

    one, bulk = asyncio.run(both())
    for image, result in zip([batch[0], *batch], [one, *bulk], strict=True):
        assert isinstance(result["outputs"], np.ndarray)
        close(result["outputs"].tolist(), local(typed_pool, cnn, image.tolist()))
