"""agent-workers: a Celery worker pool for deep-learning inference and training jobs.

Importing this package has no side effects: no logging setup, no connection, no model load. The model and training
names are imported lazily, so a producer (``agent_workers.client``) never pays for importing torch.
"""

from typing import Any

from agent_workers.config import BatchSettings, Settings
from agent_workers.errors import (
    AgentWorkersError,
    ConfigError,
    InputError,
    ModelError,
    StoreError,
    StoreUnavailableError,
    VersionConflictError,
)

_LAZY = {
    "HyperParams": "agent_workers.training.optim",
    "ModelSpec": "agent_workers.models",
    "architectures": "agent_workers.models",
    "make_spec": "agent_workers.models",
    "register_architecture": "agent_workers.models",
    "register_loss": "agent_workers.training.optim",
}

__all__ = [
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'agent_workers' has no attribute {name!r}")
