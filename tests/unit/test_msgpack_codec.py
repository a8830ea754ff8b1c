"""Contract 1.3 without a worker: raw-bytes tensors of msgpack messages, ``output_encoding``, and the client's
msgpack envelope (byte for byte what kombu's own msgpack serializer puts on the wire)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest
from celery import Celery

from agent_workers.client.messages import predict_parts_msgpack
from agent_workers.contract import bind_predict_call
from agent_workers.errors import InputError
from agent_workers.outputs import encoded_output
from agent_workers.tensors import DTYPES, TensorSpec, decode_tensor, decode_tensor_object, encode_tensor
from agent_workers.wire import MSGPACK, Envelope

ARRAYS = [
    np.array([[True, False], [False, True]]),
    np.arange(12, dtype=np.uint8).reshape(3, 4),
    np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32),
    np.array([-(2**63), 7, 2**63 - 1], dtype=np.int64),
    np.array([0.5, -2.0], dtype=np.float16),
    np.array([[0.25, -1.5, 3.0]], dtype=np.float32),
]


def spec_of(array: np.ndarray) -> TensorSpec:
    name = next(n for n, dt in DTYPES.items() if dt == array.dtype.newbyteorder("<") and n != "bfloat16")
    return TensorSpec("x", name, array.shape)


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: str(a.dtype))
def test_every_dtype_decodes_from_raw_bytes_through_msgpack(array: np.ndarray) -> None:
    wire = msgpack.unpackb(msgpack.packb(encode_tensor(array, raw=True), use_bin_type=True), raw=False)
    assert isinstance(wire["data"], bytes) and len(wire["data"]) == array.nbytes  # no base64: the bytes themselves
    decoded = decode_tensor(spec_of(array), wire, max_elements=100)
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == array.dtype


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"dtype": "uint8", "shape": [2, 2], "data": b"\x00" * 3}, "take 4 bytes; data carries 3"),
        ({"dtype": "uint8", "shape": [2, 2], "data": "AAAAAA=="}, "data must be raw bytes"),
        ({"dtype": "uint8", "shape": [2, 2], "data": [0, 1, 2, 3]}, "data must be raw bytes"),
        ({"dtype": "int32", "shape": [1], "data": b"\x00" * 4}, "takes dtype uint8"),
        ({"dtype": "uint8", "shape": [2, 2], "data": b"\x00" * 4, "b64": "AAAAAA=="}, "got keys"),
        ({"dtype": "uint8", "shape": [10**9, 10**9], "data": b""}, "the limit is"),
    ],
)
def test_a_bad_raw_tensor_fails_naming_the_fault(value: dict[str, Any], says: str) -> None:
    with pytest.raises(InputError, match=says):
        decode_tensor(TensorSpec("x", "uint8", (-1, 2)), value, max_elements=1000)


def test_output_encoding_is_json_by_default_and_refuses_what_it_does_not_know() -> None:
    assert bind_predict_call(["m", [1.0]], {}).output_encoding == "json"
    assert bind_predict_call(["m", [1.0], None, None, None, None, "b64"], {}).output_encoding == "b64"
    assert bind_predict_call(["m", [1.0]], {"output_encoding": None}).output_encoding == "json"
    for bad in ("raw", "B64", 1, ["b64"]):
        with pytest.raises(InputError, match="output_encoding must be one of"):
            bind_predict_call(["m", [1.0]], {"output_encoding": bad})


def test_b64_outputs_keep_their_dtype_and_round_trip() -> None:
    row = {"logits": np.array([0.1, -2.5], dtype=np.float32), "count": np.array([3], dtype=np.int64)}
    encoded = encoded_output(row, "b64")
    assert encoded["logits"]["dtype"] == "float32" and encoded["count"] == {
        "dtype": "int64",
        "shape": [1],
        "b64": base64.b64encode(np.int64(3).tobytes()).decode(),
    }
    json.dumps(encoded)  # the result record is JSON
    for name, array in row.items():
        np.testing.assert_array_equal(decode_tensor_object(encoded[name]), array)
    assert encoded_output(row["logits"], "json").tolist() == [float(np.float32(0.1)), -2.5]
    with pytest.raises(InputError, match="not a binary tensor"):
        decode_tensor_object({"dtype": "float64", "shape": [1], "b64": "AAAAAAAAAAA="})


def kombu_msgpack_message(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What ``send_task(..., serializer="msgpack")`` puts on a virtual (Redis-like) transport."""
    app = Celery("unit", broker="memory://", backend="disabled://", set_as_current=False)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    app.send_task("agent_workers.predict", kwargs=kwargs, queue=queue, serializer="msgpack")
    with app.connection_for_read() as conn:
        message = conn.default_channel._get(queue)
    app.close()
    return message


def test_the_client_msgpack_envelope_is_what_kombu_writes() -> None:
    image = np.arange(48, dtype=np.uint8).reshape(3, 4, 4)
    body, kwrepr = predict_parts_msgpack("cnn", image, 2, "b64")
    envelope = Envelope(task="agent_workers.predict", queue="q", reply_to="r", content=MSGPACK)
    ours = json.loads(envelope.redis("id-1", body, "()", kwrepr))
    kwargs = {"model": "cnn", "inputs": encode_tensor(image, raw=True), "version": 2, "output_encoding": "b64"}
    theirs = kombu_msgpack_message(kwargs)
    assert (ours["content-type"], ours["content-encoding"]) == (theirs["content-type"], theirs["content-encoding"])
    assert ours["content-type"] == "application/x-msgpack"
    unpacked = msgpack.unpackb(base64.b64decode(ours["body"]), raw=False)
    assert unpacked == msgpack.unpackb(base64.b64decode(theirs["body"]), raw=False)
    assert unpacked[1]["inputs"]["data"] == image.tobytes()
    # the raw body is the pixels plus a few dozen bytes of framing (JSON b64 would be 4/3 of them)
    assert len(body) < image.nbytes + 200
