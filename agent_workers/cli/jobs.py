"""``agent-workers predict``, ``fit`` and ``status``: send jobs and look at the pool."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from agent_workers.cli._base import settings as read_settings
from agent_workers.config import Settings

#: Seconds workers get to answer a broadcast (``status``, the consumer check before ``predict`` / ``fit``).
DEFAULT_PING_WINDOW = 1.0


def consumers(app: Any, timeout: float) -> dict[str, list[str]]:
    """Worker node name -> the queues it consumes (one broadcast, answers for ``timeout`` seconds)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return {node: sorted(q["name"] for q in queues) for node, queues in replies.items()}


def require_consumer(app: Any, queue: str, role: str, timeout: float = DEFAULT_PING_WINDOW) -> None:
    """Fail at once, naming the queue, when no worker consumes ``queue`` (instead of waiting for the timeout)."""
    if not any(queue in queues for queues in consumers(app, timeout).values()):
        raise click.ClickException(
            f"no worker consumes the {role} queue {queue!r}; start one (agent-workers worker -Q {role}) and check "
            "with agent-workers status"
        )


def producer(settings: Settings) -> Any:
    from agent_workers.client import producer_app

    app = producer_app(settings)
    # A CLI must say "unreachable" in seconds, not retry for ever.
    app.conf.broker_connection_timeout = 3
    app.conf.broker_connection_max_retries = 1
    return app


@click.command()
@click.argument("model")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--many", is_flag=True, help="Send all rows in one predict_many message instead of one each.")
@click.option("--timeout", default=60.0, show_default=True)
def predict(model: str, path: Path, many: bool, timeout: float) -> None:
    """Score the rows of PATH (.json, .csv, .npy or .parquet) with MODEL; prints one JSON result per row.

    A row the workers refuse prints {"row": i, "error": ...} in its place; the others still print, and the exit code
    is 1. Rows not answered within --timeout print {"row": i, "error": "ResultTimeout ...", "task_id": ...} (they
    expire at the timeout, so workers drop them unserved), after every row that was answered.
    """
    from agent_workers.cli.tables import read_rows
    from agent_workers.client import Client, PublishError, ResultTimeout

    settings = read_settings()
    rows = read_rows(path)
    app = producer(settings)
    require_consumer(app, settings.inference_queue, "inference")
    with Client(settings, app=app) as client:
        try:
            if many:
                click.echo(json.dumps(client.predict_many(model, rows, timeout=timeout)))
                return
            results = client.predict_bulk(model, rows, timeout=timeout, return_exceptions=True, expires=timeout)
        except ResultTimeout as exc:
            if many:
                raise click.ClickException(_no_result(timeout, settings.inference_queue)) from None
            results = [exc.partial.get(i, _Unanswered(task_id)) for i, task_id in enumerate(exc.ids)]
        except PublishError as exc:
            raise click.ClickException(f"{exc}; nothing was printed, run the command again") from None
    failed = []
    for i, result in enumerate(results):
        if isinstance(result, _Unanswered):
            failed.append(i)
            text = f"ResultTimeout: no result within {timeout:g}s"
            click.echo(json.dumps({"row": i, "error": text, "task_id": result.task_id}))
        elif isinstance(result, BaseException):
            failed.append(i)
            click.echo(json.dumps({"row": i, "error": f"{type(result).__name__}: {result}"}))
        else:
            click.echo(json.dumps(result))
    unanswered = sum(isinstance(r, _Unanswered) for r in results)
    if unanswered:
        click.echo(
            f"error: {unanswered} of {len(results)} rows: {_no_result(timeout, settings.inference_queue)}", err=True
        )
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
        click.echo(f"error: {len(failed)} of {len(results)} rows failed (rows {shown}); see their lines", err=True)
        sys.exit(1)


class _Unanswered:
    """A row with no result by the deadline (its place in the output)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id


def _no_result(timeout: float, queue: str) -> str:
    return (
        f"no result within {timeout:g}s from the inference queue {queue!r}; see agent-workers status (are its "
        "workers busy or stopped?)"
    )


@click.command()
@click.argument("model")
@click.argument("dataset")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=100, show_default=True)
@click.option("--loss", default="mse", show_default=True, help="mse, cross_entropy or a registered loss.")
@click.option("--optimizer", default="sgd", show_default=True, help="sgd or adam.")
@click.option("--lr", default=0.05, show_default=True, help="Learning rate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the mini-batch order.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait for the whole job.")
@click.option("--quiet", is_flag=True, help="No progress bar; print only the result.")
def fit(
    model: str,
    dataset: str,
    epochs: int,
    batch_size: int,
    loss: str,
    optimizer: str,
    lr: float,
    seed: int,
    timeout: float,
    quiet: bool,
) -> None:
    """Train MODEL on an uploaded DATASET in one worker (agent_workers.fit), with a progress bar; prints the result."""
    from tqdm import tqdm

    from agent_workers.client import Client, ResultTimeout

    settings = read_settings()
    app = producer(settings)
    require_consumer(app, settings.training_queue, "training")
    with Client(settings, app=app) as client, tqdm(desc=f"fit {model}", unit="step", disable=quiet) as bar:

        def on_progress(meta: dict[str, Any]) -> None:
            bar.total = meta["steps"]
            bar.update(meta["step"] - bar.n)
            loss = "?" if meta.get("loss") is None else f"{meta['loss']:.4f}"
            bar.set_postfix(epoch=f"{meta['epoch']}/{meta['epochs']}", loss=loss, refresh=True)

        try:
            result = client.fit(
                model,
                dataset,
                epochs=epochs,
                batch_size=batch_size,
                hparams={"loss": loss, "optimizer": optimizer, "lr": lr},
                seed=seed,
                timeout=timeout,
                on_progress=on_progress,
            )
        except ResultTimeout:
            raise click.ClickException(f"fit not done within {timeout:g}s; see agent-workers status") from None
    click.echo(json.dumps({k: result[k] for k in ("model", "version", "steps", "history")}))


@click.command()
@click.option(
    "--timeout", default=DEFAULT_PING_WINDOW, show_default=True, help="Seconds to wait for workers to answer."
)
def status(timeout: float) -> None:
    """Workers online and the queues each consumes, models and versions, queue depths."""
    from agent_workers.cli.models import store

    settings = read_settings()
    app = producer(settings)
    nodes = consumers(app, timeout)
    click.echo(f"workers online: {len(nodes)}")
    for name in sorted(nodes):
        click.echo(f"  {name}\t{','.join(nodes[name])}")
    params = store()
    click.echo("models:")
    for name in params.list():
        click.echo(f"  {name}\tv{params.head(name).version}")
    click.echo("queues:")
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for role, queue in (("inference", settings.inference_queue), ("training", settings.training_queue)):
            try:
                depth = channel.queue_declare(queue=queue, passive=True).message_count
            except Exception:  # noqa: BLE001 - a queue nobody declared yet
                channel = conn.channel()  # RabbitMQ closes the channel of a failed passive declare
                depth = 0
            n = sum(queue in q for q in nodes.values())
            click.echo(f"  {queue}\t{depth} waiting\t{n} consumers")
            if n == 0:
                click.echo(
                    f"warning: no worker consumes the {role} queue {queue!r} "
                    f"(start one: agent-workers worker -Q {role})",
                    err=True,
                )
