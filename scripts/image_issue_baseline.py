"""The image workload's JSON path as it was when issue 19 was filed, drained in the same sitting as today's.

``agent-workers bench --workload image`` sets each encoding against ``json-float``: pixels / 255 as a nested JSON
list of floats, served by *today's* worker, whose float path has since become several times cheaper. The issue's
goal "drain ≥ 5× today's JSON path" means the path of its day (commit 7fafbdc: 104–111 images/s, 8.9–9.5 ms of
worker CPU per image, measured then). This script drains that path for real, in the sitting of the benchmark it is
compared with: the worker of a checkout of 7fafbdc serving one of today's benchmark CNNs, declared with
``input_shape`` [3, 64, 64] (all that commit took), to the same JSON float messages.

Run it with the old checkout's package first on the path, from this repository's root (it reads the CNN's source
from ``agent_workers/tools/image_cnn.py`` here, so both sides serve the same model)::

    git worktree add /tmp/aw-7fafbdc 7fafbdc
    PYTHONPATH=/tmp/aw-7fafbdc .venv/bin/python scripts/image_issue_baseline.py --broker both --n 600

Prints, per broker, the drain rate (images/s) and the worker CPU per image, and writes them as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis

import agent_workers

if (Path(__file__).resolve().parents[1] / "agent_workers") == Path(agent_workers.__file__).resolve().parent:
    sys.exit("run with PYTHONPATH=<a checkout of 7fafbdc>: this imported today's agent_workers")

from agent_workers.params import RedisParamStore  # 7fafbdc's place (today: agent_workers.store.params)

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.tools.bench.measure import Sampler, drain_rate, interpolate, read_done_times
from agent_workers.tools.supervisor import WorkerProcess, derive_settings

ROOT = Path(__file__).resolve().parents[1]
BROKERS = {"redis": "redis://127.0.0.1:6379/0", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//"}
SHAPE = (3, 64, 64)
WIDTHS = {"bench_cnn_wide": (32, 64, 64), "bench_cnn": (16, 32)}
PLUGIN = "issue_baseline_cnn"


def write_plugin(where: Path, architecture: str) -> None:
    """A plugin module for the old worker: today's ``BenchCNN`` source, registered the old way (no signature)."""
    source = (ROOT / "agent_workers" / "tools" / "image_cnn.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "BenchCNN")
    (where / f"{PLUGIN}.py").write_text(
        "import torch\nfrom agent_workers.models import register_architecture\n\n\n"
        + ast.get_source_segment(source, cls)
        + f"\n\n\n@register_architecture({architecture!r})\n"
        + "def build(*, classes: int = 10) -> torch.nn.Module:\n"
        + f"    return BenchCNN(classes, {WIDTHS[architecture]!r})\n"
    )


def drain(broker: str, architecture: str, n: int, plugin_dir: Path) -> dict[str, object]:
    ns = "ib" + uuid.uuid4().hex[:8]
    settings = derive_settings(
        Settings.from_env(),
        broker_url=BROKERS[broker],
        namespace=ns,
        inference_queue=f"{ns}.inference",
        training_queue=f"{ns}.training",
        plugins=(PLUGIN,),
        result_expires=3600,
        batch={"max_batch_size": 64},
    )
    store = RedisParamStore.from_settings(settings)
    store.create("bench-cnn-f32", make_spec(architecture, input_shape=list(SHAPE)), seed=0)
    rows = np.random.default_rng(2).integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)
    client = Client(settings)
    try:
        ids = client.send_predict_bulk("bench-cnn-f32", [(image / 255.0).tolist() for image in rows])
        env = settings.to_env() | {"PYTHONPATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        worker = WorkerProcess(queues=[settings.inference_queue], env=env, loglevel="WARNING")
        worker.start(wait=False)
        backend = redis.Redis.from_url(settings.result_backend)
        try:
            with Sampler(worker.pid, backend) as sampler:
                worker.wait_ready()
                client.collect(ids, timeout=600)
        finally:
            worker.stop()
        times, failed = read_done_times(backend, ids)
    finally:
        client.close()
        store.delete("bench-cnn-f32")
    rate, seconds, counted = drain_rate(times)
    cpu = interpolate(sampler.worker, max(times)) - interpolate(sampler.worker, min(times))
    return {
        "broker": broker,
        "architecture": architecture,
        "encoding": "json-float (7fafbdc)",
        "n": n,
        "failed": failed,
        "rate": rate,
        "seconds": seconds,
        "counted": counted,
        "cpu_ms_per_image": 1000 * cpu / counted if counted else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both")
    parser.add_argument("--architecture", choices=sorted(WIDTHS), default="bench_cnn_wide")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        write_plugin(Path(tmp), args.architecture)
        sys.path.insert(0, tmp)
        importlib.import_module(PLUGIN)  # the spec is built here once before it is stored, as the CLI does
        for broker in brokers:
            started = time.perf_counter()
            run = drain(broker, args.architecture, args.n, Path(tmp))
            runs.append(run)
            print(
                f"{broker}: {args.architecture} json-float on {Path(agent_workers.__file__).parents[1].name}: "
                f"{run['rate']:,.0f} images/s, worker CPU {run['cpu_ms_per_image']:.3f} ms/image "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
