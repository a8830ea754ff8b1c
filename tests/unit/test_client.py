"""The client's hand-built messages are the ones Celery and kombu build, byte for byte where it matters (no network).

The integration tests prove workers accept them; these pin the envelope field by field against kombu's own
output, so a kombu or Celery upgrade that changes the format fails here first.
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
from typing import Any

import numpy as np
import pytest
from amqp import spec
from amqp.basic_message import Message
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from celery import Celery

from agent_workers.client import AmqpFrames, Client, Envelope, _predict_parts
from agent_workers.config import Settings
from agent_workers.errors import InputError, ModelError, StoreUnavailableError, VersionConflictError

QUEUE = "t-unit.inference"
TASK = "agent_workers.predict"


def kombu_message(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What ``send_task`` puts on a virtual (Redis-like) transport: the in-memory broker keeps the dict it LPUSHes."""
    app = Celery("unit", broker="memory://", backend="disabled://", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    queue = f"q-{uuid.uuid4().hex[:8]}"
    app.send_task(TASK, kwargs=kwargs, queue=queue)
    with app.connection_for_read() as conn:
        message = conn.default_channel._get(queue)
    app.close()
    return message


def test_redis_envelope_has_exactly_the_fields_and_types_kombu_writes() -> None:
    body, kwrepr = _predict_parts(json.dumps("house"), "house", [0.5, -1.0, 2.0], None)
    ours = json.loads(Envelope(task=TASK, queue=QUEUE, reply_to="r-1").redis("id-1", body, "()", kwrepr))
    theirs = kombu_message({"model": "house", "inputs": [0.5, -1.0, 2.0]})

    assert ours.keys() == theirs.keys()
    assert ours["content-type"] == theirs["content-type"] == "application/json"
    assert ours["content-encoding"] == theirs["content-encoding"] == "utf-8"
    assert ours["properties"].keys() == theirs["properties"].keys()
    for key in ("delivery_mode", "priority", "body_encoding"):
        assert ours["properties"][key] == theirs["properties"][key], key
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}
    assert ours["properties"]["correlation_id"] == "id-1"
    uuid.UUID(ours["properties"]["delivery_tag"])  # unique per message, as kombu makes it

    assert ours["headers"].keys() == theirs["headers"].keys()
    differ = {"id", "root_id", "origin", "ignore_result"}
    assert {k: v for k, v in ours["headers"].items() if k not in differ} == {
        k: v for k, v in theirs["headers"].items() if k not in differ}
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == "id-1"

    decoded = json.loads(base64.b64decode(ours["body"]))
    assert decoded == json.loads(base64.b64decode(theirs["body"]))


def test_predict_parts_encode_numpy_versions_and_a_short_kwargs_repr() -> None:
    body, kwrepr = _predict_parts(json.dumps("m"), "m", np.arange(3, dtype=np.float32), 7)
    assert json.loads(body) == [[], {"model": "m", "inputs": [0.0, 1.0, 2.0], "version": 7},
                                {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert kwrepr == "{'model': 'm', 'inputs': [0.0, 1.0, 2.0], 'version': 7}"
    _, long_repr = _predict_parts(json.dumps("m"), "m", [0.123456789] * 1000, None)
    assert len(long_repr) < 160 and long_repr.endswith("...}")


def test_envelope_carries_expires() -> None:
    ours = json.loads(Envelope(task=TASK, queue=QUEUE, reply_to="r").redis("i", b"[]", "()", "{}",
                                                                            "2026-11-26T00:00:00+00:00"))
    assert ours["headers"]["expires"] == "2026-11-26T00:00:00+00:00"


# -- AMQP frames ------------------------------------------------------------------------------------------------------


def parse_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split raw AMQP frames into (type, channel, payload), checking sizes and frame-end octets."""
    frames, offset = [], 0
    while offset < len(data):
        kind, channel, size = struct.unpack_from(">BHI", data, offset)
        payload = data[offset + 7 : offset + 7 + size]
        assert data[offset + 7 + size] == 0xCE, "missing frame-end"
        frames.append((kind, channel, payload))
        offset += 8 + size
    return frames


def decoded(data: bytes) -> dict[str, Any]:
    """The method arguments, properties and body that a broker reads from one message's frames."""
    (m_kind, m_chan, method), (h_kind, h_chan, header), *bodies = parse_frames(data)
    assert (m_kind, h_kind) == (1, 2) and {k for k, _, _ in bodies} <= {3} and m_chan == h_chan
    class_id, weight, size = struct.unpack_from(">HHQ", header)
    message = Message()
    message._load_properties(class_id, header, 12)
    body = b"".join(p for _, _, p in bodies)
    assert len(body) == size and weight == 0
    return {"channel": m_chan, "method": method, "properties": message.properties, "body": body,
            "body_frames": len(bodies)}


def py_amqp_frames(channel_id: int, frame_max: int, queue: str, body: bytes, properties: dict[str, Any]) -> bytes:
    """The frames py-amqp's own writer produces for ``basic_publish`` (what kombu sends)."""

    class Sink:
        frame_max = 0
        bytes_sent = 0

        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, chunk: Any) -> None:
            self.data += bytes(chunk)

    sink = Sink()
    sink.frame_max = frame_max
    write = frame_writer(sink, sink)
    write(1, channel_id, spec.Basic.Publish, dumps("Bssbb", (0, "", queue, False, False)), Message(body, **properties))
    return bytes(sink.data)


@pytest.mark.parametrize(("frame_max", "size", "expires"), [(131072, 60, None), (4096, 10_000, "2026-01-01T00:00:00")])
def test_amqp_frames_read_exactly_like_py_amqps(frame_max: int, size: int, expires: str | None) -> None:
    envelope = Envelope(task=TASK, queue=QUEUE, reply_to="client-1")
    body = b"[" + b"1," * (size // 2) + b"1]"
    ours = decoded(AmqpFrames(envelope, channel_id=3, frame_max=frame_max).render("id-9", body, "{'k': 1}", expires))
    properties = {"content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 2, "priority": 0,
                  "application_headers": envelope.headers("id-9", "()", "{'k': 1}", expires),
                  "correlation_id": "id-9", "reply_to": "client-1"}
    theirs = decoded(py_amqp_frames(3, frame_max, QUEUE, body, properties))
    assert ours == theirs
    assert ours["properties"]["application_headers"]["id"] == "id-9"
    assert ours["body_frames"] == -(-len(body) // (frame_max - 8))


# -- errors -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def client() -> Client:
    """A client that never connects (connections are opened lazily)."""
    return Client(Settings())


@pytest.mark.parametrize(("payload", "cls", "text"), [
    ({"exc_type": "InputError", "exc_message": ["bad shape"], "exc_module": "agent_workers.errors"}, InputError,
     "bad shape"),
    ({"exc_type": "ModelError", "exc_message": ["unknown model 'x'"], "exc_module": "agent_workers.errors"},
     ModelError, "unknown model"),
    ({"exc_type": "StoreUnavailableError", "exc_message": ["down"], "exc_module": "agent_workers.errors"},
     StoreUnavailableError, "down"),
    ({"exc_type": "VersionConflictError", "exc_message": ["lost", 3, 4], "exc_module": "agent_workers.errors"},
     VersionConflictError, "lost"),
])
def test_failures_come_back_as_our_typed_errors(client: Client, payload: dict[str, Any], cls: type, text: str) -> None:
    error = client.error_from(payload)
    assert type(error) is cls and text in str(error)
    if cls is VersionConflictError:
        assert (error.expected, error.actual) == (3, 4)


def test_other_failures_come_back_as_celery_rebuilds_them(client: Client) -> None:
    from celery.exceptions import TaskRevokedError

    assert isinstance(client.error_from({"exc_type": "TaskRevokedError", "exc_message": ["expired"],
                                         "exc_module": "celery.exceptions"}), TaskRevokedError)
    assert isinstance(client.error_from({"exc_type": "ValueError", "exc_message": ["x"], "exc_module": "builtins"}),
                      ValueError)
    assert isinstance(client.error_from("garbage"), Exception)
