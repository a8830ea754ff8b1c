"""``agent-workers datasets``: upload, list, show and delete training datasets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from agent_workers.cli._base import settings, shown

DEFAULT_TTL = 7 * 24 * 3600  # agent_workers.training.datasets.DEFAULT_TTL, without importing numpy for --help


def store() -> Any:
    from agent_workers.training.datasets import DatasetStore

    return DatasetStore.from_settings(settings())


def expiry(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600}h{rest % 3600 // 60:02d}m"


def describe(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "rows": info.rows,
        "features": info.features,
        "bytes": info.bytes,
        "uploaded": None
        if info.uploaded_at is None
        else datetime.fromtimestamp(info.uploaded_at, UTC).isoformat(timespec="seconds"),
        "expires_in": expiry(info.expires_in),
        "upload": info.upload,
        **({"inputs": info.inputs} if info.inputs is not None else {}),
    }


@click.group()
def datasets() -> None:
    """Upload, list, show and delete training datasets (kept in the parameter store's Redis)."""


@datasets.command("upload")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--ttl",
    type=click.IntRange(min=0),
    default=DEFAULT_TTL,
    show_default=True,
    help="Seconds until the dataset expires; 0 keeps it until deleted.",
)
def datasets_upload(name: str, path: Path, ttl: int) -> None:
    """Upload PATH as dataset NAME: .npz with arrays x and y, or .npy/.csv/.parquet whose last column is y.

    A .npz x keeps its dtype and shape (uint8 images, int64 token ids); rows of different lengths go in as x_values
    and x_offsets, several named inputs as x.NAME (or x.NAME.values and x.NAME.offsets)."""
    from agent_workers.cli.tables import read_xy

    x, y = read_xy(path)
    store().upload(x, y, dataset_id=name, ttl=ttl)
    info = store().info(name)
    what = f"× {info.features} features" if info.inputs is None else f"of inputs {json.dumps(info.inputs)}"
    click.echo(f"uploaded {shown(name)}: {info.rows} rows {what}, expires in {expiry(ttl or None)}")


@datasets.command("list")
def datasets_list() -> None:
    """List datasets: name, rows, features (or each typed input's dtype and shape), expiry."""
    for info in store().list():
        d = describe(info)
        what = f"{d['features']} features" if info.inputs is None else f"inputs {json.dumps(info.inputs)}"
        click.echo(f"{shown(d['name'])}\t{d['rows']} rows\t{what}\texpires in {d['expires_in']}")


@datasets.command("show")
@click.argument("name")
def datasets_show(name: str) -> None:
    """Show NAME's rows, features, size, upload time and expiry (JSON)."""
    import json

    click.echo(json.dumps(describe(store().info(name)), indent=2))


@datasets.command("delete")
@click.argument("name")
def datasets_delete(name: str) -> None:
    """Delete NAME."""
    if not store().delete(name):
        raise click.ClickException(f"no dataset {ascii(name)}; see agent-workers datasets list")
    click.echo(f"deleted {shown(name)}")
