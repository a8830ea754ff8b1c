"""The exception tree survives Celery's result backend: pickle and JSON round trips keep class and message."""

from __future__ import annotations

import json
import pickle

import pytest
from celery import Celery

import agent_workers
from agent_workers import errors

ALL = [
    errors.AgentWorkersError,
    errors.ConfigError,
    errors.InputError,
    errors.ModelError,
    errors.StoreError,
    errors.StoreUnavailableError,
]


@pytest.mark.parametrize("cls", ALL)
def test_error_round_trips_through_pickle(cls: type[errors.AgentWorkersError]) -> None:
    exc = cls("inputs must have shape [3]")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == "inputs must have shape [3]"


def test_conflict_keeps_its_versions_through_pickle() -> None:
    exc = errors.VersionConflictError("lost", expected=3, actual=5)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.expected, back.actual, str(back)) == (3, 5, "lost")


@pytest.mark.parametrize("cls", ALL)
def test_error_round_trips_through_the_json_result_backend(cls: type[errors.AgentWorkersError]) -> None:
    app = Celery(set_as_current=False, backend="cache+memory://")
    app.conf.result_serializer = "json"
    backend = app.backend
    payload = json.loads(json.dumps(backend.prepare_exception(cls("bad thing"))))
    rebuilt = backend.exception_to_python(payload)
    assert type(rebuilt) is cls and str(rebuilt) == "bad thing"


def test_every_error_descends_from_the_root() -> None:
    for cls in ALL + [errors.VersionConflictError]:
        assert issubclass(cls, errors.AgentWorkersError)


def test_public_api_is_pinned() -> None:
    assert agent_workers.__all__ == sorted(agent_workers.__all__)
    assert agent_workers.__all__ == [
        "AgentWorkersError",
        "BatchSettings",
        "ConfigError",
        "HyperParams",
        "InputError",
        "ModelError",
        "ModelSpec",
        "Settings",
        "StoreError",
        "StoreUnavailableError",
        "VersionConflictError",
        "architectures",
        "make_spec",
        "register_architecture",
        "register_loss",
    ]


def test_producers_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, agent_workers.client; assert 'torch' not in sys.modules, 'client pulled in torch'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_lazy_names_resolve() -> None:
    for name in agent_workers.__all__:
        assert getattr(agent_workers, name) is not None


def test_the_client_errors_keep_their_rows_and_ids_through_pickle() -> None:
    exc = errors.PublishError("2 of 3 queued", ["a", "b", "c"], [0, 2], [1], [])
    back = pickle.loads(pickle.dumps(exc))
    assert (back.ids, back.queued, back.not_sent, back.unknown, str(back)) == (
        ["a", "b", "c"],
        [0, 2],
        [1],
        [],
        str(exc),
    )
    assert isinstance(back, errors.StoreUnavailableError)
    timeout = pickle.loads(pickle.dumps(errors.ResultTimeout("1 of 2 not ready", ["a", "b"], ["b"])))
    assert (timeout.ids, timeout.pending, timeout.partial) == (["a", "b"], ["b"], {})
    from celery.exceptions import TimeoutError as CeleryTimeout

    assert isinstance(timeout, CeleryTimeout) and isinstance(timeout, errors.AgentWorkersError)
