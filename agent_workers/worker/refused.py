"""Envelopes the Redis transport refuses (:mod:`agent_workers.worker.kombu_redis`): why kombu could not restore one
(:func:`unrestorable`, checked by the pop script's twin in Python before a restore), and who is told the task ids of
the ones the pop script moved to a dead-letter list (an intake, which stores a FAILURE for each of its task)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


#: id(kombu Connection) -> callbacks told the (task id, task name) of envelopes the pop script dead-lettered.
_refused_listeners: dict[int, list[Callable[[list[tuple[str, str]]], None]]] = {}


def subscribe_refused(connection: Any, callback: Callable[[list[tuple[str, str]]], None]) -> None:
    """Call ``callback`` with the (task id, task name) of every envelope the pop script on ``connection`` moves to
    a dead-letter list (an intake stores a FAILURE for the ids of its task)."""
    if connection is not None:
        _refused_listeners.setdefault(id(connection), []).append(callback)


def unsubscribe_refused(connection: Any, callback: Callable[[list[tuple[str, str]]], None]) -> None:
    callbacks = _refused_listeners.get(id(connection), [])
    if callback in callbacks:
        callbacks.remove(callback)
    if not callbacks:
        _refused_listeners.pop(id(connection), None)


def tell_refused(connection: Any, refused: list[tuple[str, str]]) -> None:
    for callback in list(_refused_listeners.get(id(connection), ())):
        try:
            callback(refused)
        except Exception:  # noqa: BLE001 - a result write must not stop the consumer
            log.exception("storing the failures of %d dead-lettered envelopes failed", len(refused))


def unrestorable(payload: Any, exchange: Any, routing_key: Any) -> str | None:
    """Why kombu's restore (``Channel._do_restore_message``) could not put ``payload`` back, or None: it sets
    ``headers.redelivered`` and ``delivery_info.redelivered``, routes by exchange and routing key (the default
    exchange by routing key alone), and reads the priority with ``int()``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        return "no properties object"
    if "headers" in payload and not isinstance(payload["headers"], dict):
        return "headers is not an object"
    properties = payload["properties"]
    if not isinstance(properties.get("delivery_info"), dict):
        return "properties.delivery_info is not an object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no delivery tag"
    if not isinstance(exchange, str) or not isinstance(routing_key, str) or not (exchange or routing_key):
        return f"no route (exchange {exchange!r:.40}, routing key {routing_key!r:.40})"
    try:
        int(properties.get("priority") or 0)
    except OverflowError:
        return f"priority {properties.get('priority')!r:.40}"
    except (TypeError, ValueError):
        pass  # kombu falls back to the default priority
    return None
