"""Pure batching logic: argument binding, input validation, the adaptive policy, bisection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent_workers.config import BatchSettings
from agent_workers.contract import bind_predict
from agent_workers.errors import InputError, ModelError
from agent_workers.models import make_spec
from agent_workers.worker.inference import LoadedModel, validate_input
from agent_workers.worker.policy import BatchPolicy

SPEC = make_spec("linear", in_features=3)


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ([1, 2], "got length 2"),
        ("abc", "got str"),
        ({"a": 1}, "got dict"),
        (None, "got NoneType"),
        ([1, "x", 3], "must be numbers"),
        ([1, [2, 3], 4], "must be numbers"),
        ([[1], [2], [3]], "got [3, 1]"),
        ([1, float("nan"), 3], "NaN or infinity"),
        ([1, float("inf"), 3], "NaN or infinity"),
        ([], "got length 0"),
    ],
)
def test_bad_inputs_are_named(inputs: object, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        validate_input(SPEC, inputs, max_elements=100)
    assert fragment in str(info.value)


def test_oversized_input_is_refused() -> None:
    spec = make_spec("linear", in_features=50)
    with pytest.raises(InputError, match="the limit is 10"):
        validate_input(spec, [0.0] * 50, max_elements=10)


def test_good_input_becomes_float32() -> None:
    array = validate_input(SPEC, [1, 2.5, -3], max_elements=100)
    assert array.dtype == np.float32 and array.tolist() == [1.0, 2.5, -3.0]


def test_bind_predict_accepts_positional_and_keyword() -> None:
    assert bind_predict(["m", [1]], {}) == ("m", [1], None)
    assert bind_predict([], {"model": "m", "inputs": [1], "version": 2}) == ("m", [1], 2)


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ([], {}, "takes (model, inputs, version=None)"),
        ([1, [1]], {}, "model must be a model name"),
        (["m", [1]], {"version": "2"}, "version must be an integer"),
        (["m", [1]], {"colour": 1}, "takes"),
    ],
)
def test_bind_predict_refuses_bad_calls(args: list, kwargs: dict, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        bind_predict(args, kwargs)
    assert fragment in str(info.value)


def test_fixed_policy_uses_settings_as_given() -> None:
    policy = BatchPolicy(BatchSettings(max_batch_size=32, max_wait_ms=7))
    for n in (1, 8, 32):
        policy.observe(n, 0.001 * n)
    assert policy.max_batch_size == 32 and policy.max_wait == pytest.approx(0.007)


def test_adaptive_policy_learns_cost_and_caps_batch_to_latency_target() -> None:
    # Each request costs 1 ms plus 2 ms per batch; a 20 ms target leaves 10 ms for compute -> 8 requests.
    policy = BatchPolicy(BatchSettings(max_batch_size=128, max_wait_ms=50, mode="adaptive", latency_target_ms=20))
    for n in [1, 2, 4, 8, 16, 32, 3, 5, 7, 9]:
        policy.observe(n, 0.002 + 0.001 * n)
    assert policy.predicted(10) == pytest.approx(0.012)
    assert policy.max_batch_size == 8
    assert policy.max_wait == pytest.approx((0.020 - 0.010) / 2)


def test_adaptive_policy_without_history_uses_settings() -> None:
    policy = BatchPolicy(BatchSettings(max_batch_size=16, max_wait_ms=3, mode="adaptive"))
    assert policy.max_batch_size == 16 and policy.max_wait == pytest.approx(0.003)


class _Raises(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] < 0).any()):
            raise RuntimeError("boom")
        return x * 2


def test_run_batch_bisects_to_the_culprits() -> None:
    from agent_workers.config import Settings
    from agent_workers.worker.inference import InferenceEngine

    engine = InferenceEngine(store=None, settings=Settings.from_env({}))  # type: ignore[arg-type]
    loaded = LoadedModel("m", 1, "e", SPEC, _Raises(), torch.device("cpu"))
    arrays = [np.array([v, 0, 0], dtype=np.float32) for v in [1, 2, -3, 4, 5, -6, 7]]
    out = engine.run_batch(loaded, arrays)
    assert [isinstance(o, ModelError) for o in out] == [False, False, True, False, False, True, False]
    assert out[0] == [2.0, 0.0, 0.0] and "failed on this input: boom" in str(out[2])


def test_corked_acks_go_out_in_one_write_and_the_transport_is_restored() -> None:
    from types import SimpleNamespace

    from agent_workers.worker.kombu_amqp import corked

    sent: list[bytes] = []

    class Transport:
        def __init__(self) -> None:
            self._write = sent.append  # what TCPTransport sets: the socket's sendall

        def write(self, data: bytes) -> None:
            self._write(data)

    transport = Transport()
    own = transport._write
    channel = SimpleNamespace(connection=SimpleNamespace(transport=transport))
    with corked(channel):
        buffer = bytearray(b"ack-1")
        transport.write(memoryview(buffer))
        buffer[:] = b"ack-2"  # py-amqp's frame writer reuses its buffer between frames
        transport.write(memoryview(buffer))
        assert sent == []
    assert sent == [b"ack-1ack-2"]
    assert transport._write == own
    with corked(SimpleNamespace()):  # not py-amqp: nothing to cork, nothing breaks
        pass


def _received(headers: dict, kwargs: dict) -> dict:
    import threading
    from types import SimpleNamespace

    from agent_workers import metrics
    from agent_workers.worker.reporting import Reporter

    sent: list[dict] = []
    eventer = SimpleNamespace(enabled=True, send=lambda type_, **fields: sent.append({"type": type_, **fields}))
    reporter = Reporter(eventer=eventer, labels=metrics.ModelLabels())
    assert reporter._loop == threading.get_ident()
    req = SimpleNamespace(id="t1", name="agent_workers.predict", args=[], kwargs=kwargs, retries=0, headers=headers)
    reporter.announce([req])
    (event,) = sent
    assert event["type"] == "task-received" and event["uuid"] == "t1"
    return event


def test_task_received_shows_the_producers_repr_headers_cut_to_the_limit() -> None:
    from agent_workers.worker.results import ARGS_REPR_LIMIT

    kwargs = {"model": "m", "inputs": list(range(1000))}
    event = _received({"argsrepr": "()", "kwargsrepr": "{'model': 'm', 'inputs': " + "1, " * 500}, kwargs)
    assert event["args"] == "()"
    assert event["kwargs"].startswith("{'model': 'm', 'inputs': 1, 1, ")
    assert len(event["kwargs"]) == ARGS_REPR_LIMIT and event["kwargs"].endswith("...")


def test_task_received_summarises_the_decoded_call_when_the_producer_sent_no_repr() -> None:
    event = _received({}, {"model": "m", "inputs": list(range(1000))})
    assert event["args"] == "()"
    assert event["kwargs"] == "{'model': 'm', 'inputs': <1000 items>}"
