"""Fuzz the tensor decoder in a real worker (Hypothesis) on both brokers: every decode error of contract 1.2 (bad
base64, a shape that does not match the bytes, a dtype the model does not take, an int past int64, NaN, a mapping
that misnames the inputs) fails its own request alone with an ``InputError``, published in one go with good
batch-mates that all succeed with the outputs torch computes here."""

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
from agent_workers.tensors import encode_tensor
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


@given(
    bad=st.lists(
        st.tuples(st.sampled_from([*KINDS, "nan-weight", "misnamed"]), st.integers(0, 5)), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**16),
)
def test_every_decode_error_fails_alone_while_batch_mates_succeed(
    typed_pool: Pool,  # noqa: F811 - the imported fixture
    fuzz_model: str,
    bad: list[tuple[str, int]],
    seed: int,
) -> None:
    pool = typed_pool
    goods = [good_tensors(seed + i) for i in range(3)]
    requests = [hostile(kind, n) for kind, n in bad]
    mixed = goods[:1] + requests + goods[1:]  # hostile requests between good ones, published in one go
    handles = [
        pool.client.app.send_task(PREDICT, args=[fuzz_model, inputs], queue=pool.settings.inference_queue)
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
