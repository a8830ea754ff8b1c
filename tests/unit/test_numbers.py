"""One rule for the numbers a message carries (agent_workers/numbers.py), and the fields that use it."""

from __future__ import annotations

import math
import types

import pytest
from celery import states

from agent_workers import numbers
from agent_workers.contract import bind_predict_call
from agent_workers.errors import InputError
from agent_workers.worker import deadlines
from agent_workers.worker.intake import Intake
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome

HUGE = "1" + "0" * 400


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("18446744073709551615", 2**64 - 1),  # the largest integer orjson keeps
        ("18446744073709551616", float(2**64)),
        ("-9223372036854775809", -float(2**63 + 1)),
        ("100000000000000000000000", 1e23),
        (HUGE, math.inf),
        ("1e400", math.inf),
        ("-1e400", -math.inf),
    ],
)
def test_a_number_parses_the_same_whatever_else_the_message_holds(literal: str, expected: object) -> None:
    plain = numbers.loads(f"[{literal}]")[0] if literal not in (HUGE, "1e400", "-1e400") else None
    fallback = numbers.loads(f"[{literal}, NaN]")[0]  # NaN: orjson refuses the text, the stdlib parses it
    assert fallback == expected and type(fallback) is type(expected)
    if plain is not None:
        assert plain == fallback and type(plain) is type(fallback)


def test_a_5000_digit_literal_is_an_infinity_not_a_parse_error() -> None:
    assert numbers.loads("[" + "9" * 5000 + "]") == [math.inf]


@pytest.mark.parametrize("value", [True, 1.0, math.inf, "3", None, 2**63, -1, 10**400])
def test_integer_refuses_and_names_the_field(value: object) -> None:
    with pytest.raises(InputError, match="^min_version must be an integer from 0"):
        numbers.integer("min_version", value, low=0)


@pytest.mark.parametrize("value", [True, "1", math.inf, math.nan, 10**400])
def test_finite_refuses_and_names_the_field(value: object) -> None:
    with pytest.raises(InputError, match="^lr must be a finite number"):
        numbers.finite("lr", value)
    assert numbers.finite("lr", 2**64) == float(2**64)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("deadline_ms", {"deadline_ms": 10**400}),
        ("deadline_ms", {"deadline_ms": math.inf}),
        ("deadline_ms", {"deadline_ms": 10**17}),
        ("version", {"version": math.inf}),
        ("version", {"version": 2**64}),
        ("min_version", {"min_version": float(2**64)}),
    ],
)
def test_predict_numbers_past_their_range_are_input_errors(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InputError, match=field):
        bind_predict_call(["m", [1.0]], kwargs)


def _request(*, kwargs: dict[str, object] | None = None, priority: object = None) -> Pending:
    properties = {} if priority is None else {"priority": priority}
    message = types.SimpleNamespace(properties=properties)
    return Pending("id", "agent_workers.predict", message, ["m", [1.0]], kwargs or {}, {}, 0.0, None)


@pytest.mark.parametrize(("raw", "rank"), [(1000, 9), (-5, 0), (3.7, 3), ("7", 7), ("x", 0), (math.inf, 0)])
def test_redis_priority_is_read_as_kombu_reads_it(raw: object, rank: int) -> None:
    req = _request(priority=raw)
    deadlines.stamp(req, broker_is_redis=True)
    assert req.rank == rank


def test_a_huge_deadline_is_left_to_binding_not_raised_on_arrival() -> None:
    req = _request(kwargs={"deadline_ms": 10**400})
    assert deadlines.stamp(req, broker_is_redis=False) is False and req.deadline is None


def test_deadline_ms_in_seconds_is_named_in_the_revoke_reason() -> None:
    now = 1_800_000_000.0
    req = _request(kwargs={"deadline_ms": int(now) + 30})
    deadlines.stamp(req, broker_is_redis=False)
    outcome = deadlines.too_late(req, now, 0.0)
    assert outcome is not None and "looks like unix seconds" in str(outcome.result)
    ms = _request(kwargs={"deadline_ms": int(now * 1000) - 5})
    deadlines.stamp(ms, broker_is_redis=False)
    late = deadlines.too_late(ms, now, 0.0)
    assert late is not None and "seconds" not in str(late.result)


# -- the intake's last resort and retries ---------------------------------------------------------------------------


class _Probe(Intake):
    """An intake without a consumer: records what it would store and publish."""

    def __init__(self, *, broker_is_redis: bool = True, admit_raises: Exception | None = None) -> None:
        self.pending: list[Pending] = []
        self.finished: list[Outcome] = []
        self.sent: list[dict[str, object]] = []
        self._idle = False
        self.max_message_bytes = 1 << 20
        self.admit_raises = admit_raises
        settings = types.SimpleNamespace(broker_is_redis=broker_is_redis)
        self.app = types.SimpleNamespace(settings=settings, send_task=lambda *a, **kw: self.sent.append(kw))

    def _hold_or_admit(self, request: Pending) -> None:
        if self.admit_raises is not None:
            raise self.admit_raises
        self.pending.append(request)

    def _finish(self, outcomes: list[Outcome]) -> None:
        self.finished.extend(outcomes)


def _message(task_id: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        headers={"id": task_id, "task": "agent_workers.predict", "retries": 0},
        body=b'[["m", [1.0]], {}, {}]',
        content_type="application/json",
        delivery_info={},
        properties={"priority": 12},
    )


def test_a_fault_after_receiving_stores_a_failure_instead_of_raising_or_dropping() -> None:
    probe = _Probe(admit_raises=OverflowError("int too large to convert to float"))
    probe.on_message(_message("t1"), None, None, None, None)  # before: the OverflowError left the consumer
    [outcome] = probe.finished
    assert outcome.request.id == "t1" and outcome.state == states.FAILURE
    assert isinstance(outcome.result, InputError) and "OverflowError" in str(outcome.result)


def test_a_producer_redelivered_header_is_not_a_redelivery() -> None:
    probe = _Probe()
    message = _message("t2")
    message.headers["redelivered"] = True
    probe.on_message(message, None, None, None, None)
    assert [r.redelivered for r in probe.pending] == [False]
    message.delivery_info = {"redelivered": True}  # the broker's word
    probe.on_message(message, None, None, None, None)
    assert [r.redelivered for r in probe.pending] == [False, True]


@pytest.mark.parametrize(("redis", "priority"), [(True, 9), (False, 12)])
def test_a_retry_keeps_its_priority(redis: bool, priority: int) -> None:
    probe = _Probe(broker_is_redis=redis)
    probe.on_message(_message("t3"), None, None, None, None)
    assert probe._publish_retry(Outcome(probe.pending[0], states.RETRY, RuntimeError("x"), retry_countdown=0.5))
    assert probe.sent[0]["priority"] == priority and probe.sent[0]["task_id"] == "t3"


@pytest.mark.parametrize(("field", "epochs", "batch_size"), [("epochs", 10**400, 10), ("batch_size", 1, 2.0)])
def test_fit_refuses_epochs_and_batch_sizes_past_their_range(field: str, epochs: object, batch_size: object) -> None:
    import numpy as np

    from agent_workers.training.optim import HyperParams
    from agent_workers.training.steps import fit

    x, y = np.zeros((4, 1), np.float32), np.zeros((4, 1), np.float32)
    with pytest.raises(InputError, match=f"^{field} must be an integer"):  # before any step: no store needed
        fit(None, "m", x, y, HyperParams(), epochs=epochs, batch_size=batch_size, update_prefix="u")  # type: ignore[arg-type]
