"""The Celery app module: ``celery -A tasks worker`` (or ``agent-workers worker``).

``app`` is built from ``AGENT_WORKERS_*`` settings; the task modules are thin adapters over the library.
"""

from agent_workers.app import create_app

app = create_app()

__all__ = ["app"]
