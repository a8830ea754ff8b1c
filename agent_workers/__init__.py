"""agent-workers: a Celery worker pool for deep-learning inference and training jobs.

Importing this package has no side effects: no logging setup, no connection, no model load.
"""

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
from agent_workers.models import ModelSpec, architectures, make_spec, register_architecture
from agent_workers.training import HyperParams, register_loss

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
