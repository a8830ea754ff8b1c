"""Does preprocessing stall other models? The C=1 latency of a model without hooks, alone and while another model's
PNG requests are being decoded, with preprocess hooks in the thread pool and on the event loop.

Run it (minutes; a real Redis broker, two workers started one after the other)::

    python -m agent_workers.tools.bench.preprocess --out docs

For each ``AGENT_WORKERS_PREPROCESS_THREADS`` (2: the pool; 0: hooks on the event loop, what a serving loop does
without a pool) one worker serves two models: ``plain`` (a linear model, tensors in) and ``png`` (PNG bytes in,
decoded and resized by a preprocess hook). The benchmark times ``n`` sequential ``plain`` requests alone, then again
while ``load`` PNG requests are kept in flight, and prints the latencies, their ratio (loaded / alone, measured in
the same worker in one run) and the PNGs decoded per second; ``--out`` also draws them
(``preprocess-latency.png``). A PNG request alone is timed too: what preprocessing adds to one request, against which
a CPU queue in front of the inference queue would add one more broker hop (the ``plain`` C=1 latency bounds it).

Imported by a worker (``AGENT_WORKERS_PLUGINS=agent_workers.tools.bench.preprocess``) it registers ``bench_png``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_workers.hooks import raw_bytes
from agent_workers.models import register_architecture
from agent_workers.store.artifacts import Artifacts

PNG_SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [1, 32, 32]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}
PLUGIN = "agent_workers.tools.bench.preprocess"  # also when run as __main__
TENSORS_MODEL = "png_tensors"
#: mode -> AGENT_WORKERS_PREPROCESS_THREADS. ``cpu-tier`` decodes in another process (the PNG sender's, standing in
#: for a CPU worker queue in front of the inference queue) and sends tensors; it saves the worker the decode and
#: costs each PNG request one more broker hop, which this emulation does not pay (the plain C=1 latency bounds it).
MODES = {"pool-2": 2, "pool-1": 1, "loop": 0, "cpu-tier": 2}


def decode(raw: Any, artifacts: Artifacts) -> np.ndarray:
    """PNG bytes -> greyscale uint8 [1, 32, 32] (Pillow's decoder and resize)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw_bytes(raw, "image"))) as image:
        return np.array(image.convert("L").resize((32, 32)), dtype=np.uint8)[None]


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(32 * 32, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.linear(pixels.float().flatten(1) / 255.0)


@register_architecture("bench_png", signature=PNG_SIGNATURE, preprocess=decode)
def build_bench_png() -> torch.nn.Module:
    """A linear classifier of 32×32 greyscale images (the model is cheap: the decode is what is measured)."""
    return _Head()


@register_architecture("bench_png_tensors", signature=PNG_SIGNATURE)
def build_bench_png_tensors() -> torch.nn.Module:
    """``bench_png`` without its hook: what a CPU tier in front of the inference queue sends tensors to."""
    return _Head()


def png_bytes(side: int) -> bytes:
    """An RGB gradient PNG, ``side`` × ``side``: small on the wire (it compresses), costly to decode and resize, so
    the benchmark measures decoding rather than moving bytes (1024: 19 KB, ~12 ms to decode here)."""
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _latencies(client: Any, model: str, inputs: Any, n: int) -> list[float]:
    """``n`` sequential requests (C=1), in ms, the CPU tier's decode included (see :func:`_request`)."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.predict(model, _request(model, inputs), timeout=60)
        times.append((time.perf_counter() - started) * 1000)
    return times


def _flood(env: dict[str, str], model: str, inputs: Any, load: int, stop: Any, done: Any) -> None:
    """In its own process (the timed client keeps its GIL): keep ``load`` PNG requests in flight until ``stop``,
    counting the answered ones in ``done``."""
    from agent_workers.client import Client
    from agent_workers.config import Settings

    with Client(Settings.from_env(env)) as client:
        in_flight = [client.send_predict(model, _request(model, inputs)) for _ in range(load)]
        while not stop.is_set():
            client.wait(in_flight.pop(0), timeout=120)
            with done.get_lock():
                done.value += 1
            in_flight.append(client.send_predict(model, _request(model, inputs)))


def _request(model: str, image: Any) -> Any:
    """The PNG request as sent: raw, or (the CPU tier, emulated in the sending process) decoded to its tensor."""
    return decode(image, Artifacts()) if model == TENSORS_MODEL else image


def run_setting(mode: str, *, n: int, load: int, side: int, broker_url: str) -> dict[str, Any]:
    """One worker in ``mode`` (:data:`MODES`): plain C=1 alone, PNG C=1 alone, plain C=1 under PNG load."""
    threads = MODES[mode]
    from agent_workers.client import Client
    from agent_workers.config import Settings
    from agent_workers.models import make_spec
    from agent_workers.store.params import RedisParamStore
    from agent_workers.tools.supervisor import WorkerProcess

    ns = "bp" + uuid.uuid4().hex[:8]
    env = {
        "AGENT_WORKERS_BROKER_URL": broker_url,
        "AGENT_WORKERS_NAMESPACE": ns,
        "AGENT_WORKERS_INFERENCE_QUEUE": f"{ns}.inference",
        "AGENT_WORKERS_TRAINING_QUEUE": f"{ns}.training",
        "AGENT_WORKERS_DEVICE": "cpu",
        "AGENT_WORKERS_PLUGINS": PLUGIN,
        "AGENT_WORKERS_PREPROCESS_THREADS": str(threads),
        "AGENT_WORKERS_MAX_WAIT_MS": "2",
    }
    settings = Settings.from_env(env)
    store = RedisParamStore.from_settings(settings)
    store.create("plain", make_spec("linear", in_features=16))
    store.create("png", make_spec("bench_png"))
    store.create(TENSORS_MODEL, make_spec("bench_png_tensors"))
    png_model = TENSORS_MODEL if mode == "cpu-tier" else "png"
    worker = WorkerProcess(queues=[settings.inference_queue], env=env).start()
    image = {"image": {"b64": base64.b64encode(png_bytes(side)).decode()}}
    row = [0.5] * 16
    try:
        with Client(settings) as client:
            _latencies(client, "plain", row, 20)  # warm both models and the connections
            _latencies(client, png_model, image, 5)
            alone = _latencies(client, "plain", row, n)
            png_alone = _latencies(client, png_model, image, max(10, n // 5))
            spawn = multiprocessing.get_context("spawn")
            stop, done = spawn.Event(), spawn.Value("l", 0)
            background = spawn.Process(target=_flood, args=(env, png_model, image, load, stop, done))
            background.start()
            while done.value < load:  # the flood has made a full round: decoding is under way
                time.sleep(0.01)  # noqa: sleep-ok - polling a counter in a benchmark, not a test
            started, before = time.perf_counter(), done.value
            loaded = _latencies(client, "plain", row, n)
            decoded = (done.value - before) / (time.perf_counter() - started)
            stop.set()
            background.join(timeout=180)
    finally:
        worker.stop()
        keys = list(store.client.scan_iter(match=f"{ns}:*"))
        if keys:
            store.client.delete(*keys)
    return {
        "mode": mode,
        "plain_alone_ms": _summary(alone),
        "png_alone_ms": _summary(png_alone),
        "plain_loaded_ms": _summary(loaded),
        "ratio_p50": statistics.median(loaded) / statistics.median(alone),
        "pngs_per_s": decoded,
    }


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bars of the plain model's C=1 p50 and p99, alone and under PNG load, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [r["mode"] for r in results]
    x = np.arange(len(results))
    for offset, key, name in ((-0.3, "plain_alone_ms", "alone"), (0.0, "plain_loaded_ms", "under PNG load")):
        for j, q in enumerate(("p50", "p99")):
            values = [r[key][q] for r in results]
            ax.bar(x + offset + j * 0.15, values, width=0.15, label=f"{name} {q}")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("C=1 latency of a model without hooks (ms)")
    ax.set_title("While another model's PNGs are decoded: pool, event loop, CPU tier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=150, help="sequential plain requests per phase")
    parser.add_argument("--load", type=int, default=16, help="PNG requests kept in flight")
    parser.add_argument("--side", type=int, default=1024, help="PNG width and height in pixels")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=None, help="write preprocess-latency.png/.json here")
    args = parser.parse_args(argv)
    results = []
    for mode in args.modes:
        print(f"{mode}: timing ...", flush=True)
        result = run_setting(mode, n=args.n, load=args.load, side=args.side, broker_url=args.broker_url)
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    if args.out is not None:
        (args.out / "preprocess-latency.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.out / "preprocess-latency.png")
        print(f"wrote {args.out / 'preprocess-latency.png'}")


if __name__ == "__main__":
    main()
