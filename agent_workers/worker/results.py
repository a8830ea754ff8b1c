"""What happened to each request, and how it is stored: many results in one pipelined round trip, in the record
Celery's Redis backend writes (``AsyncResult.get()`` and its pub/sub wake-up work unchanged)."""

from __future__ import annotations

import dataclasses
import logging
import traceback
from typing import Any

import numpy as np
import orjson
import redis
from celery import states

from agent_workers import lua
from agent_workers.contract import READY_STATES, result_record
from agent_workers.errors import AgentWorkersError, InputError

log = logging.getLogger(__name__)

ARGS_REPR_LIMIT = 120


@dataclasses.dataclass
class Outcome:
    """What happened to one request: a Celery state and its result (a value or an exception)."""

    request: Any  # batcher.Pending
    state: str
    result: Any
    runtime: float = 0.0
    retry_countdown: float | None = None  # RETRY: re-publish after this many seconds, once RETRY is stored
    #: once stored: True when its record was written, False when a final one was there already; None: not yet
    written: bool | None = None


class ResultWriter:
    """Stores many task results in one pipelined round trip, in Celery's own Redis result format.

    Each result is stored by ``lua/store_result.lua``, which never replaces a final one (SUCCESS, FAILURE,
    REVOKED): however redeliveries and retries race, a task id gets one final answer.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.backend = app.backend
        self._redis = getattr(self.backend, "client", None) if hasattr(self.backend, "get_key_for_task") else None
        self._fast = self.backend.serializer == "json" and not getattr(self.backend, "compression", None)
        self._store = self._redis.register_script(lua.source("store_result")) if self._redis is not None else None

    def write(self, outcomes: list[Outcome]) -> list[bool | None]:
        """Store ``outcomes``; per outcome, whether its record was written (False: a final result was already
        stored, or the record could not be encoded at all; None: its command failed, e.g. the backend refused the
        write: try it again later).

        Raises:
            redis.RedisError: the round trip failed; nothing is known to be stored.
        """
        if not outcomes:
            return []
        if self._redis is None:  # not a Redis backend: fall back to one store per result
            for o in outcomes:
                self.backend.store_result(o.request.id, _plain(self._result(o)), o.state, traceback=self._tb(o))
            return [True] * len(outcomes)
        done = self.app.now().isoformat()
        expires = int(self.backend.expires or 0)
        records: list[tuple[int, str, bytes]] = []
        for i, o in enumerate(outcomes):
            try:
                key, value = self.backend.get_key_for_task(o.request.id), self._encode(self._record(o, done))
            except Exception as exc:  # noqa: BLE001 - one unencodable result must not cost the others theirs
                log.exception("result of %r cannot be encoded; storing a failure instead", o.request.id)
                try:
                    failed = Outcome(o.request, states.FAILURE, InputError(f"the result cannot be stored: {exc}"))
                    key, value = self.backend.get_key_for_task(o.request.id), self._encode(self._record(failed, done))
                except Exception:  # noqa: BLE001 - not even a failure can be stored under this id
                    log.exception("no result can be stored for %r", o.request.id)
                    continue
            records.append((i, key, value))
        replies = self._store_all(records, expires)
        lost = [
            r for r, reply in zip(records, replies, strict=True) if isinstance(reply, redis.exceptions.NoScriptError)
        ]
        if lost:  # the server lost its scripts (a restart, SCRIPT FLUSH): load them, redo those commands
            assert self._store is not None and self._redis is not None
            self._redis.script_load(self._store.script)
            again = iter(self._store_all(lost, expires))
            replies = [next(again) if isinstance(r, redis.exceptions.NoScriptError) else r for r in replies]
        stored: list[bool | None] = [False] * len(outcomes)
        for (i, _, _), reply in zip(records, replies, strict=True):
            if isinstance(reply, Exception):  # this command alone failed (OOM, READONLY...): the others stand
                log.warning("storing the result of %r failed: %s", outcomes[i].request.id, reply)
                stored[i] = None
            else:
                stored[i] = bool(reply)
        return stored

    def _store_all(self, records: list[tuple[int, str, bytes]], expires: int) -> list[Any]:
        """One pipelined round trip of ``store_result.lua`` calls by EVALSHA (a registered Script in a pipeline
        would add a SCRIPT EXISTS round trip to every write); a command's error is its reply, not raised."""
        assert self._store is not None and self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        for _, key, value in records:
            pipe.evalsha(self._store.sha, 1, key, value, expires)
        return pipe.execute(raise_on_error=False) if records else []

    def final_states(self, task_ids: list[str]) -> dict[str, str]:
        """The final state already stored for each of ``task_ids`` that has one (one MGET)."""
        if self._redis is None or not task_ids:
            return {}
        found: dict[str, str] = {}
        values = self._redis.mget([self.backend.get_key_for_task(t) for t in task_ids])
        for task_id, raw in zip(task_ids, values, strict=True):
            if raw is None:
                continue
            try:
                status = orjson.loads(raw).get("status")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if status in READY_STATES:
                found[task_id] = status
        return found

    def _record(self, o: Outcome, done: str) -> dict[str, Any]:
        return result_record(
            o.request.id,
            o.state,
            self._result(o),
            traceback=self._tb(o),
            date_done=done if o.state in READY_STATES else None,
            parent_id=o.request.headers.get("parent_id"),
            group_id=o.request.headers.get("group"),
        )

    def _encode(self, meta: dict[str, Any]) -> bytes | str:
        """The record as JSON, byte-compatible with what the JSON backend decodes. orjson writes NumPy rows
        directly (float32 in their shortest round-tripping form), ~10x faster than ``json`` on large outputs."""
        if self._fast:
            return orjson.dumps(meta, option=orjson.OPT_SERIALIZE_NUMPY)
        return self.backend.encode(_plain(meta))

    def _result(self, o: Outcome) -> Any:
        if isinstance(o.result, BaseException):
            return self.backend.prepare_exception(o.result)
        return o.result

    @staticmethod
    def _tb(o: Outcome) -> str | None:
        if isinstance(o.result, BaseException) and not isinstance(o.result, AgentWorkersError):
            return "".join(traceback.format_exception(o.result))
        return None


def _plain(value: Any) -> Any:
    """NumPy rows to lists, for serializers other than orjson."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def short_repr(value: Any, limit: int = ARGS_REPR_LIMIT) -> str:
    """A short, cheap repr for Flower: lists of numbers are summarised, never a megabyte of floats."""
    if isinstance(value, dict):
        inner = ", ".join(f"{k!r}: {_short(v)}" for k, v in list(value.items())[:8])
        text = "{" + inner + "}"
    elif isinstance(value, (list, tuple)):
        text = "(" + ", ".join(_short(v) for v in value[:8]) + ")"
    else:
        text = _short(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"<{value.size} numbers>"
    if isinstance(value, (list, tuple)):
        return f"<{len(value)} items>" if len(value) > 4 else repr(value)[:60]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in list(value.items())[:6]) + "}"
    return repr(value)[:60]
