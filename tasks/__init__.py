"""The Celery app module: ``celery -A tasks worker`` (or ``agent-workers worker``).

``app`` is built from ``AGENT_WORKERS_*`` settings; the task modules are thin adapters over the library.
"""

from agent_workers.worker.app import create_app

app = create_app()
# The process-wide app of `celery -A tasks ...`: Flower's GET /api/task/result/<id> builds a bare AsyncResult(id),
# which reads the *current* app's backend (flower/api/tasks.py TaskResult); without this Flower answers 503.
app.set_current()

__all__ = ["app"]
