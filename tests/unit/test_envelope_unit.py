"""The envelope checks at the batcher's door, the metric labels, and the transport chosen per broker scheme."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from celery import states

from agent_workers.config import Settings
from agent_workers.errors import InputError
from agent_workers.metrics import UNKNOWN_MODEL, ModelLabels
from agent_workers.worker.app import create_app, tls_options
from agent_workers.worker.batcher import Batcher
from agent_workers.worker.requests import Pending, check_headers, usable_id
from agent_workers.worker.results import Outcome

GOOD = {"id": "abc", "task": "agent_workers.predict", "retries": 0, "eta": None, "expires": "2030-01-01T00:00:00"}


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"id": 123}, "id"),
        ({"id": ""}, "id"),
        ({"id": "x" * 256}, "id"),
        ({"retries": "x"}, "retries"),
        ({"retries": -1}, "retries"),
        ({"retries": True}, "retries"),
        ({"retries": 10**6}, "retries"),
        ({"parent_id": 2**70}, "parent_id"),
        ({"root_id": {}}, "root_id"),
        ({"group": ["g"]}, "group"),
        ({"eta": "garbage"}, "eta"),
        ({"expires": 5}, "expires"),
        ({"argsrepr": "a" * 100_000}, "argsrepr"),
        ({"kwargsrepr": 7}, "kwargsrepr"),
        ({"task": 5}, "task"),
    ],
)
def test_each_bad_header_is_refused_by_name(bad: dict[str, Any], named: str) -> None:
    with pytest.raises(InputError, match=f"header '{named}'"):
        check_headers({**GOOD, **bad})


def test_good_headers_pass_and_ids_are_bounded() -> None:
    check_headers(GOOD)
    check_headers({"id": "x", "root_id": None, "parent_id": "p", "group": None, "argsrepr": "(1,)"})
    assert usable_id("x" * 255) == "x" * 255
    assert usable_id("x" * 256) is None
    assert usable_id(5) is None


def test_unknown_models_share_one_metric_label() -> None:
    labels = ModelLabels()
    assert labels.label("random-name") == UNKNOWN_MODEL
    assert labels.label(["not", "a", "name"]) == UNKNOWN_MODEL
    labels.known("house")
    assert labels.label("house") == "house"


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://127.0.0.1:6379/0", "agent_workers.worker.kombu_redis:Transport"),
        ("rediss://127.0.0.1:6380/0", "agent_workers.worker.kombu_redis:Transport"),
        (
            "sentinel://127.0.0.1:26379/0;sentinel://127.0.0.2:26379",
            "agent_workers.worker.kombu_redis:SentinelTransport",
        ),
    ],
)
def test_every_redis_broker_gets_the_loss_free_transport(url: str, transport: str) -> None:
    app = create_app(Settings.from_env({"AGENT_WORKERS_BROKER_URL": url}))
    assert app.conf.broker_transport == transport
    if url.startswith("rediss"):
        assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_tls_options_follow_the_url() -> None:
    assert tls_options("rediss://h:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem") == {
        "ssl_cert_reqs": ssl.CERT_NONE,
        "ssl_ca_certs": "/ca.pem",
    }


def test_a_fault_in_one_group_fails_only_that_group() -> None:
    batcher = Batcher.__new__(Batcher)
    batcher.track_started = False

    def serve_group(model: str, version: int | None, members: list[Any], head: Any = None) -> list[Outcome]:
        if model == "broken":
            raise RuntimeError("a bug in one group")
        return [Outcome(req, states.SUCCESS, {"model": model}) for req, _ in members]

    batcher._serve_group = serve_group  # type: ignore[method-assign]

    def request(i: int, model: str) -> Pending:
        return Pending(str(i), "agent_workers.predict", None, [model, [1.0]], {}, {}, 0.0, None)

    batch = [request(0, "fine"), request(1, "broken"), request(2, "fine"), request(3, "other")]
    outcomes, solo = batcher._serve(batch)
    assert not solo
    assert {o.request.id: o.state for o in outcomes} == {"0": "SUCCESS", "1": "FAILURE", "2": "SUCCESS", "3": "SUCCESS"}


def test_the_redis_transport_decodes_bodies_as_kombu_does_with_pybase64() -> None:
    import binascii
    import os

    from kombu.transport.virtual.base import Base64

    from agent_workers.wire import Base64Codec
    from agent_workers.worker.kombu_redis import Channel

    ours, kombus = Channel.codecs["base64"], Base64()
    assert isinstance(ours, Base64Codec)
    for size in (0, 1, 2, 3, 100, 17_000):
        raw = os.urandom(size)
        text = kombus.encode(raw)
        assert ours.encode(raw) == text and ours.encode(raw.decode("latin-1")) == kombus.encode(raw.decode("latin-1"))
        assert ours.decode(text) == raw == ours.decode(text.encode()) == kombus.decode(text)
    with pytest.raises(binascii.Error):  # what kombu's codec raises for a body that is not base64 at all
        ours.decode("abcde")
    with pytest.raises(binascii.Error):
        kombus.decode("abcde")
