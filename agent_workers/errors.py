"""The whole exception tree of agent-workers.

    AgentWorkersError                 root: catch everything of ours
    ├── ConfigError                   bad settings, raised at start-up, never mid-task
    ├── InputError                    a request that cannot be served (shape, type, size, NaN)
    ├── ModelError                    unknown model, unknown version, load or forward failure
    └── StoreError                    the parameter store
        ├── VersionConflictError      compare-and-set lost; carries expected and actual
        └── StoreUnavailableError     Redis could not be reached (wraps the redis error)

Every exception keeps its context in ``args`` so that it survives the JSON result backend: Celery stores
``type(exc).__qualname__``, ``__module__`` and ``args`` and rebuilds the exception from them on the client.
"""

from __future__ import annotations


class AgentWorkersError(Exception):
    """Root of every error raised by agent-workers."""

    def __init__(self, message: str, *args: object) -> None:
        super().__init__(message, *args)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(AgentWorkersError):
    """Settings that cannot work; raised at start-up with the fix in the message."""


class InputError(AgentWorkersError):
    """A request that cannot be served as sent; fails only that request."""


class ModelError(AgentWorkersError):
    """Unknown model or version, or a model that failed to load or to run."""


class StoreError(AgentWorkersError):
    """The parameter store refused or failed an operation."""


class VersionConflictError(StoreError):
    """A compare-and-set commit lost: the head moved from ``expected`` to ``actual``."""

    def __init__(self, message: str, expected: int = -1, actual: int = -1) -> None:
        super().__init__(message, expected, actual)
        self.expected = expected
        self.actual = actual


class StoreUnavailableError(StoreError):
    """Redis could not be reached or timed out; transient, safe to retry."""


__all__ = [
    "AgentWorkersError",
    "ConfigError",
    "InputError",
    "ModelError",
    "StoreError",
    "StoreUnavailableError",
    "VersionConflictError",
]
