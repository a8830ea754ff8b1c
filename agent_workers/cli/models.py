"""``agent-workers models``: create, list, show, history and rollback of models and their parameter versions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from agent_workers.cli._base import settings, shown


def store() -> Any:
    from agent_workers.store.params import RedisParamStore

    return RedisParamStore.from_settings(settings())


@click.group()
def models() -> None:
    """Create, list and inspect models and their parameter versions."""


@models.command("create")
@click.argument("name")
@click.option("--arch", default="linear", show_default=True, help="Registered architecture.")
@click.option(
    "--config",
    "config_json",
    default='{"in_features": 10}',
    show_default=True,
    help='Architecture config as JSON, e.g. \'{"in_features": 64, "hidden": [256, 256]}\'.',
)
@click.option("--seed", default=0, show_default=True, help="Seed of the initial weights.")
@click.option("--replace", is_flag=True, help="Recreate the model if it exists (all versions are dropped).")
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Initial weights from a .safetensors file (pickle checkpoints are refused).",
)
@click.option(
    "--signature",
    "signature_json",
    default=None,
    help='Named, typed inputs and outputs as JSON (overrides the architecture\'s), e.g. \'{"inputs": [{"name": '
    '"pixels", "dtype": "uint8", "shape": [3, 64, 64]}], "outputs": [{"name": "logits", "dtype": "float32", '
    '"shape": [10]}]}\'.',
)
@click.option(
    "--artifact",
    "artifacts",
    multiple=True,
    metavar="NAME=FILE",
    help="A file the model carries besides its weights, e.g. labels=labels.json (a JSON list: top_k's labels) or "
    "tokenizer=tokenizer.json; repeatable.",
)
def models_create(
    name: str,
    arch: str,
    config_json: str,
    seed: int,
    replace: bool,
    weights: Path | None,
    signature_json: str | None,
    artifacts: tuple[str, ...],
) -> None:
    """Create NAME at version 0 (seeded random weights, or --weights) with its --artifact files."""
    from agent_workers.models import load_weights, make_spec

    config = _json_option("--config", config_json)
    signature = None if signature_json is None else _json_option("--signature", signature_json)
    files = _artifact_files(artifacts)
    params = store()  # imports AGENT_WORKERS_PLUGINS first, so their architectures are known here too
    spec = make_spec(arch, signature=signature, **config)
    module = load_weights(spec, weights) if weights is not None else None
    params.create(name, spec, seed=seed, module=module, replace=replace, artifacts=files)
    carried = f" with artifacts {', '.join(sorted(files))}" if files else ""
    click.echo(f"created {shown(name)} ({arch}) at version 0" + (f" from {weights}" if weights else "") + carried)


@models.command("artifacts")
@click.argument("name")
@click.option("--artifact", "artifacts", multiple=True, required=True, metavar="NAME=FILE", help="As for create.")
@click.option(
    "--version",
    type=click.IntRange(min=1),
    default=None,
    help="The version they hold from [default: the next one committed]; never one already committed.",
)
def models_artifacts(name: str, artifacts: tuple[str, ...], version: int | None) -> None:
    """Set NAME's artifacts for a version not yet committed (a train_step or rollback makes it current)."""
    target = store().artifacts.put(name, _artifact_files(artifacts), version=version)
    click.echo(
        f"{shown(name)}: artifacts {', '.join(sorted(a.partition('=')[0] for a in artifacts))} hold from "
        f"version {target}"
    )


def _artifact_files(options: tuple[str, ...]) -> dict[str, bytes]:
    files = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{option!r} is not NAME=FILE", param_hint="--artifact")
        try:
            files[name] = Path(path).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="--artifact") from None
    return files


def _json_option(option: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{option} is not valid JSON: {exc}") from None


@models.command("list")
def models_list() -> None:
    """List models with their current versions."""
    params = store()
    for name in params.list():
        head = params.head(name)
        spec = params.spec(name, head.epoch)
        click.echo(f"{shown(name)}\tv{head.version}\t{spec.arch}\t{json.dumps(spec.config)}")


@models.command("show")
@click.argument("name")
def models_show(name: str) -> None:
    """Show NAME's spec, version and parameter shapes."""
    params = store()
    snap = params.read(name)
    spec = params.spec(name, snap.epoch)
    click.echo(
        json.dumps(
            {
                "model": name,
                "version": snap.version,
                **spec.to_json(),
                "signature": spec.signature.to_json(),
                "parameters": {k: list(v.shape) for k, v in snap.parameters().items()},
                "artifacts": params.artifacts.listing(name, snap.version),
            },
            indent=2,
        )
    )


@models.command("history")
@click.argument("name")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many records [default: 20; with --all, every one].",
)
@click.option("--all", "show_all", is_flag=True, help="Also the commits whose versions are no longer kept.")
def models_history(name: str, limit: int | None, show_all: bool) -> None:
    """Show NAME's newest commits of versions still kept (times in UTC, ISO 8601)."""
    params = store()
    head = params.head(name)  # an unknown model is an error, not an empty history
    oldest = max(0, head.version - params.keep_versions + 1)
    if limit is None:
        limit = 0 if show_all else 20  # 0: the whole list
    for record in params.history(name, limit):
        if not show_all and int(record.get("version", head.version)) < oldest:
            continue
        if isinstance(record.get("at"), (int, float)):
            record["at"] = datetime.fromtimestamp(record["at"], UTC).isoformat(timespec="seconds")
        click.echo(json.dumps(record))


@models.command("rollback")
@click.argument("name")
@click.argument("version", type=int)
def models_rollback(name: str, version: int) -> None:
    """Make VERSION's parameters current again (as a new version)."""
    new = store().rollback(name, version)
    click.echo(f"{shown(name)}: version {version} restored as version {new}")
