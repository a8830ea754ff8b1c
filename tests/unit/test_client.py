"""The client's hand-built messages are the ones Celery and kombu build, byte for byte where it matters (no network).

The integration tests prove workers accept them; these pin the envelope field by field against kombu's own
output, so a kombu or Celery upgrade that changes the format fails here first.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import numpy as np
import pytest
from celery import Celery

from agent_workers.client import Client
from agent_workers.client.messages import predict_parts
from agent_workers.config import Settings
from agent_workers.errors import InputError, ModelError, StoreUnavailableError, VersionConflictError
from agent_workers.wire import Envelope, redis_envelope

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
    body, kwrepr = predict_parts(json.dumps("house"), "house", [0.5, -1.0, 2.0], None)
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
        k: v for k, v in theirs["headers"].items() if k not in differ
    }
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == "id-1"

    decoded = json.loads(base64.b64decode(ours["body"]))
    assert decoded == json.loads(base64.b64decode(theirs["body"]))


def test_predict_parts_encode_numpy_versions_and_a_short_kwargs_repr() -> None:
    body, kwrepr = predict_parts(json.dumps("m"), "m", [0.0, 1.0, 2.0], 7)
    assert json.loads(body) == [
        [],
        {"model": "m", "inputs": [0.0, 1.0, 2.0], "version": 7},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    assert kwrepr == "{'model': 'm', 'inputs': [0.0, 1.0, 2.0], 'version': 7}"
    # numpy arrays travel compactly since contract 1.2: raw little-endian bytes in base64
    body, _ = predict_parts(json.dumps("m"), "m", np.arange(3, dtype=np.float32), None)
    assert json.loads(body)[1]["inputs"] == {"dtype": "float32", "shape": [3], "b64": "AAAAAAAAgD8AAABA"}
    body, _ = predict_parts(json.dumps("m"), "m", {"ids": np.array([7], dtype=np.int64), "mask": [True]}, None)
    assert json.loads(body)[1]["inputs"] == {
        "ids": {"dtype": "int64", "shape": [1], "b64": "BwAAAAAAAAA="},
        "mask": [True],
    }
    _, long_repr = predict_parts(json.dumps("m"), "m", [0.123456789] * 1000, None)
    assert len(long_repr) < 160 and long_repr.endswith("...}")


def test_envelope_carries_expires() -> None:
    ours = json.loads(
        Envelope(task=TASK, queue=QUEUE, reply_to="r").redis("i", b"[]", "()", "{}", "2026-11-26T00:00:00+00:00")
    )
    assert ours["headers"]["expires"] == "2026-11-26T00:00:00+00:00"


# -- AMQP messages ----------------------------------------------------------------------------------------------------


def test_amqp_message_has_exactly_the_headers_and_properties_celery_sends() -> None:
    envelope = Envelope(task=TASK, queue=QUEUE, reply_to="client-1")
    body, kwrepr = predict_parts(json.dumps("house"), "house", [0.5, -1.0], None)
    ours = envelope.message("id-9", body, "()", kwrepr, "2026-01-01T00:00:00+00:00")
    app = Celery("unit", broker="memory://", backend="disabled://", set_as_current=False)
    headers, properties, theirs_body, _ = app.amqp.as_task_v2(
        "id-9", TASK, args=(), kwargs={"model": "house", "inputs": [0.5, -1.0]}, expires="2026-01-01T00:00:00+00:00"
    )
    app.close()
    differ = {"origin", "ignore_result"}
    assert ours.headers.keys() == headers.keys()
    assert {k: v for k, v in ours.headers.items() if k not in differ} == {
        k: v for k, v in headers.items() if k not in differ
    }
    assert ours.properties["correlation_id"] == properties["correlation_id"] == "id-9"
    assert json.loads(ours.body) == json.loads(json.dumps(theirs_body))


def test_redis_envelope_of_any_message_matches_the_template() -> None:
    envelope = Envelope(task=TASK, queue=QUEUE, reply_to="r")
    fast = json.loads(envelope.redis("i", b"[1]", "()", "{}"))
    built = json.loads(
        redis_envelope(
            envelope.message("i", b"[1]", "()", "{}"), QUEUE, delivery_tag=fast["properties"]["delivery_tag"]
        )
    )
    assert fast == built


# -- errors -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def client() -> Client:
    """A client that never connects (connections are opened lazily)."""
    return Client(Settings())


@pytest.mark.parametrize(
    ("payload", "cls", "text"),
    [
        (
            {"exc_type": "InputError", "exc_message": ["bad shape"], "exc_module": "agent_workers.errors"},
            InputError,
            "bad shape",
        ),
        (
            {"exc_type": "ModelError", "exc_message": ["unknown model 'x'"], "exc_module": "agent_workers.errors"},
            ModelError,
            "unknown model",
        ),
        (
            {"exc_type": "StoreUnavailableError", "exc_message": ["down"], "exc_module": "agent_workers.errors"},
            StoreUnavailableError,
            "down",
        ),
        (
            {"exc_type": "VersionConflictError", "exc_message": ["lost", 3, 4], "exc_module": "agent_workers.errors"},
            VersionConflictError,
            "lost",
        ),
    ],
)
def test_failures_come_back_as_our_typed_errors(client: Client, payload: dict[str, Any], cls: type, text: str) -> None:
    error = client.error_from(payload)
    assert type(error) is cls and text in str(error)
    if cls is VersionConflictError:
        assert (error.expected, error.actual) == (3, 4)


def test_other_failures_come_back_as_celery_rebuilds_them(client: Client) -> None:
    from celery.exceptions import TaskRevokedError

    assert isinstance(
        client.error_from(
            {"exc_type": "TaskRevokedError", "exc_message": ["expired"], "exc_module": "celery.exceptions"}
        ),
        TaskRevokedError,
    )
    assert isinstance(
        client.error_from({"exc_type": "ValueError", "exc_message": ["x"], "exc_module": "builtins"}), ValueError
    )
    assert isinstance(client.error_from("garbage"), Exception)
