"""How ``agent-workers worker`` (and the tools) start a worker process: its ``celery worker`` command line and
environment."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent_workers.config import Settings


#: A node name's mark for a part unique to each worker process, filled in as the worker starts (bootsteps.py), so
#: that one command line, run any number of times, never starts two workers of one name.
UNIQUE = "{unique}"


def unique_node_name(hostname: str) -> str:
    """``hostname`` with :data:`UNIQUE` replaced by a random part (8 hex digits)."""
    return hostname.replace(UNIQUE, uuid.uuid4().hex[:8])


def worker_command(
    *,
    queues: list[str],
    hostname: str,
    loglevel: str = "INFO",
    concurrency: int = 1,
    prefetch_multiplier: int = 1,
    pool: str = "threads",
    extra: list[str] | None = None,
) -> list[str]:
    """The ``celery worker`` command line for one worker process of ours."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks",
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-Q",
        ",".join(queues),
        "-n",
        hostname,
        "-l",
        loglevel,
        "-E",
        "--prefetch-multiplier",
        str(prefetch_multiplier),
        "--without-mingle",
        "--without-gossip",
        *(extra or []),
    ]


def settings_env(settings_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment plus ``AGENT_WORKERS_*`` overrides, with the repo importable."""
    env = dict(os.environ)
    env.update(settings_env or {})
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def worker_prefetch(settings: Settings, queues: list[str]) -> int:
    """The prefetch multiplier a worker of these queues needs: 2 × the batch size for inference (a batch can fill
    while the previous one runs), the largest group for grouped training (``AGENT_WORKERS_TRAIN_GROUP_MAX``, at
    least ``AGENT_WORKERS_TRAIN_GROUP``: the adaptive group can form), else 1."""
    prefetch = 1
    if settings.inference_queue in queues:
        prefetch = 2 * settings.batch.max_batch_size
    if settings.training_queue in queues:
        prefetch = max(prefetch, max(settings.train_group, settings.train_group_max) if settings.train_group > 1 else 1)
    return prefetch
