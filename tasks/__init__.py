"""The Celery app module: ``celery -A tasks worker`` (or ``agent-workers worker``).

``app`` is built from ``AGENT_WORKERS_*`` settings; the task modules are thin adapters over the library.
"""

import sys

from agent_workers.config import unknown_variables
from agent_workers.errors import ConfigError
from agent_workers.worker.app import create_app

for _name, _nearest in unknown_variables():
    print(
        f"agent-workers: warning: {_name} is not a setting and is ignored"
        + (f"; did you mean {_nearest}?" if _nearest else ""),
        file=sys.stderr,
    )
try:
    app = create_app()
except ConfigError as exc:
    # `celery -A tasks ...` would print a 41-line traceback around this one line; the line names the fix.
    print(f"agent-workers: ConfigError: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
# The process-wide app of `celery -A tasks ...`: Flower's GET /api/task/result/<id> builds a bare AsyncResult(id),
# which reads the *current* app's backend (flower/api/tasks.py TaskResult); without this Flower answers 503.
app.set_current()

__all__ = ["app"]
