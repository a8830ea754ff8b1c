"""A predict request as the batcher holds it: the message, its decoded body, and the headers it carries.

Headers come from any producer, so they are checked once, here, before a request joins a batch
(:func:`check_headers`): everything the batcher, the result writer, events and the transport read later is then of
the type and size they expect, and one producer's mistake cannot cost its batch-mates their answers.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from agent_workers import numbers
from agent_workers.contract import PredictCall, bind_predict_call
from agent_workers.errors import InputError

MAX_ID_LENGTH = 255
MAX_RETRIES_HEADER = 1_000
MAX_REPR_LENGTH = 64 * 1024
_ID_HEADERS = ("root_id", "parent_id", "group")
_TIME_HEADERS = ("eta", "expires")
_REPR_HEADERS = ("argsrepr", "kwargsrepr")


@dataclasses.dataclass
class Pending:
    """One buffered predict request, still unacknowledged."""

    id: str
    name: str
    message: Any
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    received: float
    expires: datetime | None
    redelivered: bool = False
    #: unix seconds by which the answer is due (``expires`` or the ``deadline_ms`` argument), or None
    deadline: float | None = None
    #: serving order inside a flush: lower first (see worker/deadlines.py); 0 when the message has no priority
    rank: int = 0
    #: the ``min_version`` argument (read-your-writes), once bound
    min_version: int | None = None
    #: monotonic time a ``min_version`` request first found the store behind (it waits a bounded time)
    behind_since: float | None = None
    #: what the preprocessing threads made of raw inputs (worker/preprocessing.py); None until they saw it
    prepared: Any = None
    #: its batch's decode ahead (worker/decoding.py), running beside the batch computing before it, and its result
    decoding: Any = None
    decoded: Any = None
    #: the bound predict arguments (a PredictCall, or the error binding raised): see :meth:`predict_call`
    bound: Any = None

    @property
    def retries(self) -> int:
        return int(self.headers.get("retries") or 0)

    def predict_call(self) -> PredictCall:
        """The request's predict arguments, checked once (:func:`~agent_workers.contract.bind_predict_call`) by
        whichever stage reaches them first: the preprocessing pool, the decode ahead or the batch.

        Raises:
            InputError: the arguments do not fit the contract (every time it is asked).
        """
        if self.bound is None:
            try:
                self.bound = bind_predict_call(self.args, self.kwargs)
            except Exception as exc:  # noqa: BLE001 - InputError, or arguments no one expected: kept as the answer
                self.bound = exc
        if isinstance(self.bound, Exception):
            raise self.bound
        return self.bound

    @property
    def options(self) -> Any:
        """The ``options`` argument (built-in outputs, agent_workers/outputs.py) once bound, else None."""
        return self.bound.options if isinstance(self.bound, PredictCall) else None

    @property
    def output_encoding(self) -> str:
        """How the result carries its outputs (the ``output_encoding`` argument, contract 1.3) once bound."""
        return self.bound.output_encoding if isinstance(self.bound, PredictCall) else "json"


def usable_id(value: Any) -> str | None:
    """``value`` when it can name a result (a non-empty string of at most ``MAX_ID_LENGTH`` characters), else None."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH:
        return value
    return None


def check_headers(headers: Any) -> None:
    """Refuse headers the worker cannot carry through a batch.

    Raises:
        InputError: naming the first bad header (``id``, ``task``, ``retries``, ``root_id``/``parent_id``/``group``,
            ``eta``/``expires``, ``argsrepr``/``kwargsrepr``).
    """
    if not isinstance(headers, dict):
        raise InputError(f"message headers must be an object, got {type(headers).__name__}")
    if usable_id(headers.get("id")) is None:
        raise InputError(f"header 'id' must be a string of 1 to {MAX_ID_LENGTH} characters")
    task = headers.get("task")
    if task is not None and (not isinstance(task, str) or len(task) > MAX_ID_LENGTH):
        raise InputError(f"header 'task' must be a string of at most {MAX_ID_LENGTH} characters")
    retries = headers.get("retries")
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES_HEADER
    ):
        raise InputError(f"header 'retries' must be an integer from 0 to {MAX_RETRIES_HEADER}, got {retries!r:.40}")
    for name in _ID_HEADERS:
        value = headers.get(name)
        if value is not None and usable_id(value) is None:
            raise InputError(f"header {name!r} must be null or a string of 1 to {MAX_ID_LENGTH} characters")
    for name in _TIME_HEADERS:
        value = headers.get(name)
        if value is not None and (not isinstance(value, str) or _iso(value) is None):
            raise InputError(f"header {name!r} must be null or an ISO-8601 date-time, got {value!r:.60}")
    for name in _REPR_HEADERS:
        value = headers.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_REPR_LENGTH):
            raise InputError(f"header {name!r} must be null or a string of at most {MAX_REPR_LENGTH} characters")


def decode_body(message: Any) -> Any:
    """The message body as Python objects: JSON or msgpack, numbers read by one rule
    (:func:`agent_workers.numbers.loads`).

    Plain JSON is parsed with orjson (several times faster than ``json`` on large inputs), else with the standard
    library under orjson's number rule, so a message parses the same whatever else it holds; anything else (msgpack,
    a compressed body, another content type) goes through kombu's ``Message.decode``, which enforces
    ``accept_content`` (json and msgpack), so a pickle message raises ``ContentDisallowed`` here and is never
    unpickled. kombu unpacks msgpack with ``raw=False``: strings as ``str``, ``bin`` as ``bytes`` (the raw tensors
    of contract 1.3), map keys only ``str`` or ``bytes``.
    """
    if message.content_type == "application/json" and not (message.headers or {}).get("compression"):
        return numbers.loads(message.body)  # NaN/Infinity literals parse: validation names them
    return message.decode()


def _iso(value: str) -> datetime | None:
    if len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_time(value: Any) -> datetime | None:
    """Parse an ISO-8601 ``expires``/``eta`` header (naive means UTC); None when absent or malformed."""
    if not value or not isinstance(value, str):
        return None
    return _iso(value)


def revoked_error(why: str) -> Exception:
    from celery.exceptions import TaskRevokedError

    return TaskRevokedError(why)
