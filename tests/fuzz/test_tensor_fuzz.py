"""Fuzz the tensor decoder in a real worker (Hypothesis) on both brokers: every decode error of contracts 1.2 and 1.3
(bad base64, a shape that does not match the bytes, a dtype the model does not take, an int past int64, NaN, a
mapping that misnames the inputs; in msgpack messages also raw ``data`` of the wrong length or type) fails its own
request alone with an ``InputError``, published in one go with good batch-mates that all succeed with the outputs
torch computes here. The msgpack variant sends every JSON fault too, through kombu's msgpack serializer."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_workers.contract import PREDICT
from agent_workers.errors import InputError
from agent_workers.models import make_spec
from agent_workers.tensors import decode_tensor_object, encode_tensor
from tests.conftest import Pool, unique
from tests.integration.test_tensors import close, local, typed_pool  # noqa: F401 - typed_pool is a fixture

pytestmark = pytest.mark.integration

ROW = 6  # the fuzzed model takes int64 ids [ROW] and a float32 weight [ROW]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def good_tensors(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "ids": encode_tensor(rng.integers(-1000, 1000, ROW, dtype=np.int64)),
        "w": rng.standard_normal(ROW).astype(np.float32).tolist(),
    }


def _bad_ids(kind: str, n: int) -> Any:
    """One hostile ``ids`` tensor of the given kind; ``n`` varies its size."""
    raw = np.arange(ROW, dtype=np.int64).tobytes()
    if kind == "short-data":  # msgpack only: raw bytes one element short, or a few bytes off
        return {"dtype": "int64", "shape": [ROW], "data": raw[: -1 - n % 8]}
    if kind == "data-not-bytes":
        return {"dtype": "int64", "shape": [ROW], "data": [_b64(raw), list(raw), None, 7][n % 4]}
    if kind == "data-shape-not-bytes":
        return {"dtype": "int64", "shape": [ROW + 1 + n], "data": raw}
    if kind == "data-dtype-not-taken":
        return {"dtype": ["int32", "float32", "uint8", "bool"][n % 4], "shape": [ROW], "data": raw}
    if kind == "uint64-past-int64":  # msgpack carries integers up to 2**64 - 1, no further
        return [2**63 + n] + [0] * (ROW - 1)
    if kind == "bad-base64":
        return {"dtype": "int64", "shape": [ROW], "b64": "!" * (len(_b64(raw)))}
    if kind == "short-bytes":
        return {"dtype": "int64", "shape": [ROW], "b64": _b64(raw[: -1 - n % 8])}
    if kind == "shape-not-bytes":
        return {"dtype": "int64", "shape": [ROW + 1 + n], "b64": _b64(raw)}
    if kind == "dtype-not-taken":
        return {"dtype": "int32", "shape": [ROW], "b64": _b64(np.arange(ROW, dtype=np.int32).tobytes())}
    if kind == "int-past-int64":
        past = [2**63 + n, -(2**63) - 1 - n, 2**64 + n, 10**30][n % 4]
        return [past] + [0] * (ROW - 1)
    if kind == "float-for-int":
        return [0.5 + n] + [0] * (ROW - 1)
    if kind == "huge-shape":
        return {"dtype": "int64", "shape": [10**7 + n], "b64": _b64(raw)}
    raise AssertionError(kind)


KINDS = [
    "bad-base64",
    "short-bytes",
    "shape-not-bytes",
    "dtype-not-taken",
    "int-past-int64",
    "float-for-int",
    "huge-shape",
]


MSGPACK_KINDS = ["short-data", "data-not-bytes", "data-shape-not-bytes", "data-dtype-not-taken", "uint64-past-int64"]
#: every JSON fault that msgpack can carry (it has no integers past 64 bits: those cannot be packed at all)
MSGPACK_ALL = [k for k in KINDS if k != "int-past-int64"] + MSGPACK_KINDS


def hostile(kind: str, n: int) -> Any:
    inputs = good_tensors(n)
    if kind == "nan-weight":
        inputs["w"] = {
            "dtype": "float32",
            "shape": [ROW],
            "b64": _b64(np.full(ROW, np.nan, dtype=np.float32).tobytes()),
        }
    elif kind == "misnamed":
        inputs["mask"] = inputs.pop("w")
    else:
        inputs["ids"] = _bad_ids(kind, n)
    return inputs


@pytest.fixture(scope="module")
def fuzz_model(typed_pool: Pool) -> str:  # noqa: F811 - the imported fixture
    model = unique("fz")
    signature = {
        "inputs": [
            {"name": "ids", "dtype": "int64", "shape": [ROW]},
            {"name": "w", "dtype": "float32", "shape": [ROW]},
        ],
        "outputs": [{"name": "score", "dtype": "float32", "shape": [1]}],
    }
    typed_pool.store.create(model, make_spec("weighted", signature=signature), seed=0)
    return model


#: the faults each content type can carry, every JSON one included in msgpack (bar integers past 64 bits, which
#: msgpack cannot pack at all)
FAULTS = {
    "json": [*KINDS, "nan-weight", "misnamed"],
    "msgpack": [*MSGPACK_ALL, "nan-weight", "misnamed"],
}


@pytest.mark.parametrize("serializer", sorted(FAULTS))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_every_decode_error_fails_alone_while_batch_mates_succeed(
    typed_pool: Pool,  # noqa: F811 - the imported fixture
    fuzz_model: str,
    serializer: str,
    data: st.DataObject,
    seed: int,
) -> None:
    kinds = st.tuples(st.sampled_from(FAULTS[serializer]), st.integers(0, 5))
    _fails_alone(typed_pool, fuzz_model, data.draw(st.lists(kinds, min_size=1, max_size=4)), seed, serializer)


def _fails_alone(pool: Pool, fuzz_model: str, bad: list[tuple[str, int]], seed: int, serializer: str) -> None:
    """Publish hostile requests between good ones in one go (raw-bytes good ones in msgpack); each hostile one
    fails alone with an InputError, each good one gets the outputs torch computes here."""
    goods = [good_tensors(seed + i) for i in range(3)]
    if serializer == "msgpack":
        for good in goods:
            good["ids"] = encode_tensor(decode_tensor_object(good["ids"]), raw=True)
    requests = [hostile(kind, n) for kind, n in bad]
    mixed = goods[:1] + requests + goods[1:]  # hostile requests between good ones, published in one go
    handles = [
        pool.client.app.send_task(
            PREDICT, args=[fuzz_model, inputs], queue=pool.settings.inference_queue, serializer=serializer
        )
        for inputs in mixed
    ]
    outcomes = [_wait(pool, h) for h in handles]
    for inputs, outcome in zip(mixed, outcomes, strict=True):
        if any(inputs is g for g in goods):
            assert isinstance(outcome, dict), f"a good batch-mate failed: {outcome!r}"
            close(outcome["outputs"], local(pool, fuzz_model, inputs))
        else:
            assert isinstance(outcome, InputError), f"{inputs!r:.200} gave {outcome!r}"


def _wait(pool: Pool, handle: Any) -> Any:
    try:
        return pool.client.wait(handle, timeout=60)
    except InputError as exc:
        return exc
