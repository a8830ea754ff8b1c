"""The ``image`` workload (``agent-workers bench --workload image``): uint8 3×64×64 images to a small CNN
(:mod:`agent_workers.tools.image_cnn`), sent in each encoding a producer has, set against the model's own forward
pass at the same batch size.

Two CNNs are drained in turn: ``bench_cnn_wide`` (the scale of the CNN issue 19 measured, a forward pass of
0.3–0.5 ms per image) and ``bench_cnn`` (ten times smaller, under 0.1 ms: its CPU per image is nearly all the
worker's fixed cost per request). For each model, broker and encoding, ``n`` images are queued by a real producer
(the :class:`~agent_workers.client.Client`, whose messages are byte for byte a bare Celery producer's) before the
worker starts, then drained:

* ``json-float``: today's JSON path, the issue's baseline: the pixels / 255 as a nested list of full-precision
  floats, to the same CNN declared with a float32 input (what a model of ``input_shape`` [3, 64, 64] took before
  signatures);
* ``json``: the image as a nested JSON list of integers (what a producer without numpy support sends);
* ``b64``: ``{"dtype": "uint8", "shape": [3, 64, 64], "b64": ...}`` in JSON (contract 1.2, the Client's default);
* ``msgpack``: ``{"dtype", "shape", "data": <bin>}`` in a msgpack message (contract 1.3).

Printed per encoding: message bytes / raw pixel bytes (the body, and the Redis envelope that carries it base64'd),
worker CPU per image (``/proc`` CPU between the first and the last result's ``date_done``, over the images finished
in between) / the forward pass's CPU per image at batch ``max_batch_size`` (timed here on as many torch threads as
the worker has), the worker's fixed cost (CPU per image minus the forward pass), and the drain rate in images/s with
its ratios to the JSON paths (``json-float`` and ``json``). Written to ``docs/benchmarks/image.json`` and
``image.png``. The issue's goals (issue 19): message ≤ 1.5× the pixels, CPU per image ≤ 2× the forward pass, drain
≥ 5× today's JSON path (``json-float``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from agent_workers.client import Client
from agent_workers.client.messages import predict_parts, predict_parts_msgpack
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.bench.measure import Sampler, drain_rate, interpolate, read_done_times
from agent_workers.tools.image_cnn import ARCHITECTURE, WIDE_ARCHITECTURE
from agent_workers.tools.supervisor import WorkerProcess, derive_settings
from agent_workers.wire import JSON, MSGPACK, Envelope

PLUGIN = "agent_workers.tools.image_cnn"
SHAPE = (3, 64, 64)
PIXEL_BYTES = int(np.prod(SHAPE))
#: encoding -> (Client serializer, how one image is handed to the Client)
ENCODINGS: dict[str, tuple[str, Callable[[np.ndarray], Any]]] = {
    "json-float": ("json", lambda image: (image / 255.0).tolist()),
    "json": ("json", lambda image: image.tolist()),
    "b64": ("json", lambda image: image),
    "msgpack": ("msgpack", lambda image: image),
}
GOALS = {"message_ratio": 1.5, "cpu_ratio": 2.0, "drain_vs_json_float": 5.0}
#: the CNNs drained, the issue's scale first
MODELS = (WIDE_ARCHITECTURE, ARCHITECTURE)
#: the float32 twin of the CNN's signature, for ``json-float``
FLOAT_SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "float32", "shape": list(SHAPE)}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}


def images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 images (random pixels: no encoding gains from smooth ones)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)


def message_bytes(encoding: str, image: np.ndarray) -> tuple[int, int]:
    """(body bytes, Redis envelope bytes) of one predict message of ``image`` in ``encoding``."""
    serializer, form = ENCODINGS[encoding]
    if serializer == "msgpack":
        body, kwrepr = predict_parts_msgpack("cnn", form(image), None)
    else:
        body, kwrepr = predict_parts(json.dumps("cnn"), "cnn", form(image), None)
    envelope = Envelope(
        task="agent_workers.predict", queue="q", reply_to="r", content=MSGPACK if serializer == "msgpack" else JSON
    )
    return len(body), len(envelope.redis(str(uuid.uuid4()), body, "()", kwrepr))


def forward_ms_per_image(
    batch_size: int, threads: int, seconds: float = 1.0, architecture: str = ARCHITECTURE
) -> float:
    """A CNN's own forward pass, per image, at ``batch_size`` on ``threads`` torch threads (no messaging): CPU
    time, like the worker's, so a machine shared with other work slows neither side of the ratio."""
    import torch

    torch.set_num_threads(max(1, threads))
    module = make_spec(architecture).build().eval()
    batch = torch.from_numpy(images(batch_size, seed=1))
    with torch.inference_mode():
        for _ in range(3):  # warm
            module(batch)
        runs, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds or runs < 5:
            module(batch)
            runs += 1
        used = time.process_time() - cpu
    return 1000 * used / (runs * batch_size)


def _drain(settings: Settings, model: str, encoding: str, n: int, say: Callable[[str], None]) -> dict[str, Any]:
    serializer, form = ENCODINGS[encoding]
    rows = images(n, seed=2)
    client = Client(settings, serializer=serializer)
    try:
        started = time.perf_counter()
        ids = client.send_predict_bulk(model, [form(image) for image in rows], timeout=600)
        say(f"  {encoding}: {n} images queued in {time.perf_counter() - started:.1f} s")
        worker = WorkerProcess(queues=[settings.inference_queue], env=settings.to_env(), loglevel="WARNING")
        worker.start(wait=False)
        backend = redis.Redis.from_url(settings.result_backend)
        try:
            with Sampler(worker.pid, backend) as sampler:
                worker.wait_ready()
                client.collect(ids, timeout=600)  # raises unless every image succeeded
        finally:
            worker.stop()
        # the worker's own date_done of each result (as the other drains): a collect that starts late would see
        # stored results arrive at once
        times, _failed = read_done_times(backend, ids)
    finally:
        client.close()
    rate, seconds, counted = drain_rate(times)
    first, last = min(times), max(times)
    cpu = interpolate(sampler.worker, last) - interpolate(sampler.worker, first)
    body, envelope = message_bytes(encoding, rows[0])
    return {
        "encoding": encoding,
        "n": n,
        "body_bytes": body,
        "redis_envelope_bytes": envelope,
        "message_ratio": body / PIXEL_BYTES,
        "rate": rate,
        "seconds": seconds,
        "counted": counted,
        "cpu_ms_per_image": 1000 * cpu / counted if counted else None,
    }


def measure(
    settings: Settings,
    *,
    brokers: dict[str, str],
    n: int = 3000,
    json_n: int = 600,
    max_batch_size: int = 64,
    models: tuple[str, ...] = MODELS,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Drain ``n`` images per encoding (``json_n`` for the nested lists, 4–20× the bytes) to each of ``models`` on
    each broker."""
    forwards = {}
    for architecture in models:
        forwards[architecture] = forward_ms_per_image(max_batch_size, settings.torch_threads, architecture=architecture)
        say(
            f"image: {architecture} forward pass {forwards[architecture]:.3f} ms of CPU per image "
            f"at batch {max_batch_size}"
        )
    runs = []
    for architecture in models:
        for broker, url in brokers.items():
            runs += _drains(settings, architecture, forwards[architecture], broker, url, n, json_n, max_batch_size, say)
    return {
        "shape": list(SHAPE),
        "pixel_bytes": PIXEL_BYTES,
        "max_batch_size": max_batch_size,
        "torch_threads": settings.torch_threads,
        "models": {a: {"forward_ms_per_image": forwards[a], "parameters": _parameters(a)} for a in models},
        "goals": GOALS,
        "runs": runs,
    }


def _parameters(architecture: str) -> int:
    return sum(p.numel() for p in make_spec(architecture).build().parameters())


def _drains(
    settings: Settings,
    architecture: str,
    forward: float,
    broker: str,
    url: str,
    n: int,
    json_n: int,
    max_batch_size: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every encoding's drain of one CNN on one broker, in a namespace of its own."""
    ns = "bi" + uuid.uuid4().hex[:8]
    base = derive_settings(
        settings,
        broker_url=url,
        namespace=ns,
        inference_queue=f"{ns}.inference",
        training_queue=f"{ns}.training",
        plugins=(PLUGIN,),
        result_expires=3600,
        batch={"max_batch_size": max_batch_size},
    )
    store = RedisParamStore.from_settings(base)
    models = {
        "bench-cnn": make_spec(architecture),
        "bench-cnn-f32": make_spec(architecture, signature=FLOAT_SIGNATURE),
    }
    for name, spec in models.items():
        store.create(name, spec, seed=0)
    say(f"image, {architecture} on {broker}:")
    runs = []
    try:
        for encoding in ENCODINGS:
            model = "bench-cnn-f32" if encoding == "json-float" else "bench-cnn"
            run = _drain(base, model, encoding, json_n if encoding.startswith("json") else n, say)
            run |= {
                "broker": broker,
                "architecture": architecture,
                "forward_ms_per_image": forward,
                "cpu_ratio": run["cpu_ms_per_image"] / forward,
                "fixed_ms_per_image": run["cpu_ms_per_image"] - forward,
            }
            runs.append(run)
    finally:
        for name in models:
            store.delete(name)
    rates = {r["encoding"]: r["rate"] for r in runs}
    for run in runs:
        run["drain_vs_json_float"] = run["rate"] / rates["json-float"]
        run["drain_vs_json"] = run["rate"] / rates["json"]
        say(
            f"  {run['encoding']:>10}: message {run['message_ratio']:5.2f}x pixels "
            f"({run['body_bytes']:,} B body, {run['redis_envelope_bytes']:,} B on Redis), "
            f"CPU {run['cpu_ms_per_image']:.3f} ms/image = {run['cpu_ratio']:4.1f}x forward "
            f"(fixed {run['fixed_ms_per_image']:.3f}), "
            f"{run['rate']:,.0f} images/s = {run['drain_vs_json_float']:.1f}x json-float, "
            f"{run['drain_vs_json']:.1f}x json"
        )
    return runs


def run(settings: Settings, *, out: Path = Path("docs/benchmarks"), tag: str = "", **options: Any) -> dict[str, Any]:
    """:func:`measure`, then write ``image<tag>.json`` and ``image<tag>.png`` under ``out``."""
    say = options.get("say", print)
    report = measure(settings, **options)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"image{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"image{tag}.png")
    say(f"written {out / f'image{tag}.json'}, {out / f'image{tag}.png'}")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """One row per CNN, three panels per broker and encoding: message / pixels, CPU / forward, drain images/s
    (goals dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    models = list(report["models"])
    brokers = sorted({r["broker"] for r in runs})
    encodings = list(ENCODINGS)
    panels = [
        ("message_ratio", "message bytes / pixel bytes", report["goals"]["message_ratio"]),
        ("cpu_ratio", "worker CPU / forward pass, per image", report["goals"]["cpu_ratio"]),
        ("rate", "drain, images / s", None),
    ]
    fig, grid = plt.subplots(len(models), 3, figsize=(12, 3.6 * len(models)), squeeze=False)
    width = 0.8 / len(brokers)
    for axes, architecture in zip(grid, models, strict=True):
        mine = [r for r in runs if r["architecture"] == architecture]
        for ax, (key, label, goal) in zip(axes, panels, strict=True):
            for b, broker in enumerate(brokers):
                values = [next(r[key] for r in mine if r["broker"] == broker and r["encoding"] == e) for e in encodings]
                ax.bar([i + b * width for i in range(len(encodings))], values, width, label=broker)
            ax.set_xticks([i + width * (len(brokers) - 1) / 2 for i in range(len(encodings))], encodings)
            ax.set_ylabel(label)
            if key != "rate":
                ax.set_yscale("log")
            if goal is not None:
                ax.axhline(goal, color="k", linestyle="--", linewidth=1, label=f"goal ≤ {goal:g}")
            ax.legend(fontsize=8)
        forward = report["models"][architecture]["forward_ms_per_image"]
        axes[1].set_title(f"{architecture}: forward pass {forward:.3f} ms of CPU per image", fontsize=10)
    fig.suptitle(f"image workload: uint8 3×64×64 to two small CNNs, batch {report['max_batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
