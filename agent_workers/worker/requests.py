"""A predict request as the batcher holds it: the message, its decoded body, and the headers it carries."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson


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

    @property
    def retries(self) -> int:
        return int(self.headers.get("retries") or 0)


def decode_body(message: Any) -> Any:
    """The message body as Python objects: JSON only.

    Plain JSON is parsed with orjson (several times faster than ``json`` on large inputs); anything else (a
    compressed body, another content type) goes through kombu's ``Message.decode``, which enforces
    ``accept_content``, so a pickle message raises ``ContentDisallowed`` here and is never unpickled.
    """
    if message.content_type == "application/json" and not (message.headers or {}).get("compression"):
        try:
            return orjson.loads(message.body)
        except orjson.JSONDecodeError:
            pass  # e.g. NaN/Infinity literals, which Python producers emit: let json parse them, validation names them
    return message.decode()


def parse_time(value: Any) -> datetime | None:
    """Parse an ISO-8601 ``expires``/``eta`` header (naive means UTC); None when absent or malformed."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def revoked_error(why: str) -> Exception:
    from celery.exceptions import TaskRevokedError

    return TaskRevokedError(why)
