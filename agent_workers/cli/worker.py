"""``agent-workers worker``: the right pool, queues, prefetch and a unique node name for every process."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
from typing import Any

import click

from agent_workers.cli._base import settings as read_settings
from agent_workers.config import Settings

#: What ``-Q`` accepts besides queue names: the configured queues by their role.
ROLES = ("inference", "training")


def visible_gpus() -> list[str]:
    """GPU indices visible to this host, without initialising CUDA in this (parent) process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def resolve_queues(settings: Settings, queues: str | None) -> list[str]:
    """``-Q`` to queue names: ``inference`` and ``training`` mean the configured queues; anything else is literal."""
    by_role = {"inference": settings.inference_queue, "training": settings.training_queue}
    if not queues:
        return [settings.inference_queue, settings.training_queue]
    return [by_role.get(q.strip(), q.strip()) for q in queues.split(",") if q.strip()]


def role_of(settings: Settings, queue: str) -> str | None:
    """``inference`` or ``training`` for a configured queue, None for any other."""
    return {settings.inference_queue: "inference", settings.training_queue: "training"}.get(queue)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One worker process: its celery command line and the variables it gets on top of the environment."""

    cmd: list[str]
    env: dict[str, str]

    def line(self) -> str:
        """The exact command, as a shell would take it."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())), shlex.join(self.cmd)])


def plan(
    settings: Settings,
    *,
    queues: list[str],
    name: str | None,
    loglevel: str,
    devices: list[str],
    extra: list[str],
) -> list[Launch]:
    """The processes to start: one, or one per device (``N`` = GPU index, ``cpu`` = a CPU process).

    Default node names are unique per process (``<namespace>-<roles>-{unique}@%h``, ``-gpuN``/``-cpuN`` per device;
    each worker fills ``{unique}`` in as it starts), so the same line, printed or run, run any number of times never
    starts two workers of one node name (RabbitMQ refuses a second consumer of the node's pidbox queue). With
    several devices every process gets its own metrics port (base + index) and ready file (``<file>.<index>``).
    """
    from agent_workers.worker.launch import UNIQUE, worker_command, worker_prefetch

    roles = [role_of(settings, q) or q for q in queues]
    prefetch = worker_prefetch(settings, queues)
    base = name or f"{settings.namespace}-{'-'.join(roles)}-{UNIQUE}@%h"
    node, _, host = base.partition("@")
    if len(devices) <= 1:
        cmd = worker_command(queues=queues, hostname=base, loglevel=loglevel, prefetch_multiplier=prefetch, extra=extra)
        env = {} if not devices or devices[0] == "cpu" else {"CUDA_VISIBLE_DEVICES": devices[0]}
        if devices and devices[0] != "cpu":
            env["AGENT_WORKERS_DEVICE"] = "cuda:0"
        return [Launch(cmd, env)]
    launches = []
    for index, device in enumerate(devices):
        if device == "cpu":
            env = {"AGENT_WORKERS_DEVICE": "cpu"}
            suffix = f"cpu{index}"
        else:
            env = {"CUDA_VISIBLE_DEVICES": device, "AGENT_WORKERS_DEVICE": "cuda:0"}
            suffix = f"gpu{device}"
        if settings.metrics_port:
            env["AGENT_WORKERS_METRICS_PORT"] = str(settings.metrics_port + index)
        if settings.ready_file:
            env["AGENT_WORKERS_READY_FILE"] = f"{settings.ready_file}.{index}"
        cmd = worker_command(
            queues=queues,
            hostname=f"{node}-{suffix}@{host or '%h'}",
            loglevel=loglevel,
            prefetch_multiplier=prefetch,
            extra=extra,
        )
        launches.append(Launch(cmd, env))
    return launches


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--queues",
    "-Q",
    default=None,
    help="Queues to consume: inference and/or training (the configured AGENT_WORKERS_*_QUEUE names), or literal "
    "queue names. Default: both configured queues.",
)
@click.option(
    "--name",
    "-n",
    default=None,
    help="Node name (default: <namespace>-<roles>-{unique}@%h, -gpuN / -cpuN per device; each worker fills "
    "{unique} in as it starts).",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--gpus/--no-gpus",
    default=True,
    show_default=True,
    help="Start one worker process per visible GPU (CUDA_VISIBLE_DEVICES pinned per process).",
)
@click.option(
    "--devices",
    default=None,
    help="One process per entry instead of per visible GPU: GPU indices and/or 'cpu', e.g. 0,1 or cpu,cpu.",
)
@click.option("--print-command", is_flag=True, help="Print the celery command line(s) this would run, and exit.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    queues: str | None,
    name: str | None,
    loglevel: str,
    gpus: bool,
    devices: str | None,
    print_command: bool,
    celery_args: tuple[str, ...],
) -> None:
    """Start worker processes with the right pool, queues and prefetch (extra args go to `celery worker`)."""
    from agent_workers.worker.launch import settings_env

    settings = read_settings()
    wanted = resolve_queues(settings, queues)
    for queue in wanted:
        if role_of(settings, queue) is None:
            click.echo(
                f"warning: queue {queue!r} is neither AGENT_WORKERS_INFERENCE_QUEUE={settings.inference_queue!r} nor "
                f"AGENT_WORKERS_TRAINING_QUEUE={settings.training_queue!r}; no client sends there",
                err=True,
            )
    chosen = [d.strip() for d in devices.split(",") if d.strip()] if devices else (visible_gpus() if gpus else [])
    launches = plan(settings, queues=wanted, name=name, loglevel=loglevel, devices=chosen, extra=list(celery_args))
    if print_command:
        for launch in launches:
            click.echo(launch.line())
        return
    if len(launches) == 1:
        cmd = launches[0].cmd
        os.execvpe(cmd[0], cmd, settings_env(launches[0].env))
    procs = [subprocess.Popen(launch.cmd, env=settings_env(launch.env)) for launch in launches]
    click.echo(f"started {len(procs)} worker processes, one per device ({', '.join(chosen)})", err=True)

    def forward(signum: int, _frame: Any) -> None:
        # systemd, docker and honcho stop us with SIGTERM: pass it on so every worker shuts down warm.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    codes = [p.wait() for p in procs]
    sys.exit(max(codes))
