"""The ``agent-workers`` command: run workers, manage models and datasets, send jobs, look at the pool.

One module per command group; each imports what it needs inside its commands, so ``--help`` and the commands
that touch no tensor start without importing torch.
"""

from __future__ import annotations

import click

from agent_workers.cli import datasets, jobs, models, tools, worker
from agent_workers.cli._base import Group


@click.group(cls=Group)
@click.version_option(package_name="agent-workers")
def main() -> None:
    """agent-workers: a Celery worker pool for deep-learning inference and training jobs.

    Every setting comes from AGENT_WORKERS_* environment variables (see docs/operations.md).
    """


main.add_command(worker.worker)
main.add_command(models.models)
main.add_command(datasets.datasets)
main.add_command(jobs.predict)
main.add_command(jobs.fit)
main.add_command(jobs.status)
main.add_command(tools.demo)
main.add_command(tools.bench)
main.add_command(tools.bench_producer)
main.add_command(tools.bench_cache)
main.add_command(tools.report)
main.add_command(tools.soak)

__all__ = ["main"]
