"""The ``text`` workload: variable-length token ids to a small transformer encoder, batched by length.

``agent-workers bench --workload text`` runs, per broker and in one sitting:

* **drains** of the same ``n`` pre-filled requests (token lengths drawn from a long-tailed log-normal, median 40,
  clipped to 8–512), each message built by a bare Celery producer (``as_task_v2`` with kwargs ``{"model",
  "inputs"}``): with length-aware formation in the JSON-list and in the base64 encoding, and with
  ``AGENT_WORKERS_LENGTH_BATCHING=0`` (FIFO pad-to-longest under the same ``max_batch_tokens``) in JSON. Each
  reports throughput (first to last stored result) and the padding share of computed tokens, read from every
  result's ``batch`` metadata;
* **open loops** (Poisson arrivals at ``open_share`` of the FIFO drain rate), formation off, on, on, off (ABBA, so
  a drift of a shared machine's load falls on both alike): p50/p99 latency from each request's intended send time
  to its stored result; every fourth request carries a ``deadline_ms`` 100 ms after it is sent, and their p99 is
  set against that deadline, with how many missed it (answered late, or refused as unable to make it);
* the **raw forward pass** of the same model, in this process, over the same requests in windows of the worker's
  prefetch (2 × ``max_batch_size``), batched as the worker forms them (both formations): the ceiling.

Written to ``docs/benchmarks/text[-quick].json`` and ``text[-quick].png``.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis

from agent_workers.config import Settings
from agent_workers.contract import PREDICT, RESULT_KEY_PREFIX
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tensors import encode_tensor
from agent_workers.tools.bench.latency import LatencyRun
from agent_workers.tools.bench.measure import drain_rate, read_done_times, wait_all_stored
from agent_workers.tools.bench.messages import Publisher
from agent_workers.tools.stats import latency_summary
from agent_workers.tools.supervisor import WorkerProcess, derive_settings
from agent_workers.wire import TaskMessage

MODEL = "text"
MIN_LEN, MAX_LEN, MEDIAN_LEN, SIGMA = 8, 512, 40, 0.9
#: In the open loops every fourth request carries a ``deadline_ms`` this many ms after it is sent (the rest none).
DEADLINE_EVERY, DEADLINE_MS = 4, 100.0


def draw_lengths(n: int, seed: int = 0) -> np.ndarray:
    """``n`` token lengths from a log-normal (median 40, σ 0.9) clipped to 8–512: most short, a long tail."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(np.exp(rng.normal(np.log(MEDIAN_LEN), SIGMA, n))), MIN_LEN, MAX_LEN).astype(int)


def draw_rows(n: int, seed: int = 0, vocab: int = 1000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab, int(length)).astype(np.int64) for length in draw_lengths(n, seed)]


class Producer:
    """Bare Celery messages of ``agent_workers.predict`` (kwargs ``model`` and ``inputs``), as any app sends them."""

    def __init__(self, broker_url: str, backend_url: str, encoding: str) -> None:
        from celery import Celery

        self.app = Celery("bench-text", broker=broker_url, backend=backend_url, set_as_current=False)
        self.encoding = encoding

    def message(self, task_id: str, row: np.ndarray, deadline_ms: int | None = None) -> TaskMessage:
        """One request of ``row``; with ``deadline_ms`` (absolute unix ms) it carries that deadline."""
        inputs = encode_tensor(row) if self.encoding == "b64" else row.tolist()
        kwargs: dict[str, Any] = {"model": MODEL, "inputs": inputs}
        if deadline_ms is not None:
            kwargs["deadline_ms"] = deadline_ms
        headers, properties, body, _ = self.app.amqp.as_task_v2(task_id, PREDICT, args=(), kwargs=kwargs)
        return TaskMessage(task_id, headers, dict(properties), json.dumps(body).encode())


def raw_forward(rows: Sequence[np.ndarray], *, max_batch_size: int, max_tokens: int, by_length: bool) -> float:
    """Requests per second of the model's forward passes alone (padding included), batched as the worker forms
    them from windows of its prefetch; best of three passes (a shared machine is noisy)."""
    import torch

    from agent_workers.worker import forming
    from agent_workers.worker.inference import InferenceEngine, LoadedModel

    spec = make_spec("text_classifier")
    loaded = LoadedModel(MODEL, 0, "", spec, spec.build().eval(), torch.device("cpu"))
    engine = InferenceEngine(store=None, settings=Settings())  # type: ignore[arg-type]
    window = 2 * max_batch_size
    plans = [
        forming.plan(rows[w : w + window], max_batch_size=max_batch_size, length=len, max_tokens=max_tokens,
                     by_length=by_length)
        for w in range(0, len(rows), window)
    ]  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what a worker uses (AGENT_WORKERS_TORCH_THREADS=1)
    try:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for batch in itertools.chain.from_iterable(plans):
                engine.run_batch_arrays(loaded, list(batch))
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return len(rows) / best


class TextBench:
    """One broker's text runs. ``say`` prints progress."""

    def __init__(self, settings: Settings, *, max_batch_size: int, max_tokens: int, say: Callable[[str], None]):
        self.base = settings
        self.max_batch_size, self.max_tokens, self.say = max_batch_size, max_tokens, say
        self.backend = redis.Redis.from_url(settings.result_backend)

    def _worker(self, queue: str, length_batching: bool) -> WorkerProcess:
        settings = derive_settings(
            self.base,
            inference_queue=queue,
            training_queue=f"{queue}.training",
            batch={
                "max_batch_size": self.max_batch_size,
                "max_batch_tokens": self.max_tokens,
                "length_batching": length_batching,
            },
        )
        return WorkerProcess(queues=[queue], env=settings.to_env(), name=f"{queue}@%h", loglevel="WARNING")

    def drain(self, rows: Sequence[np.ndarray], *, encoding: str, length_batching: bool) -> dict[str, Any]:
        label = f"text drain ({'length-aware' if length_batching else 'FIFO'}, {encoding}, n={len(rows):,})"
        run = "t" + uuid.uuid4().hex[:10]
        queue = f"{self.base.namespace}.{run}"
        ids = [f"{run}-{i:07d}" for i in range(len(rows))]
        producer = Producer(self.base.broker_url, self.base.result_backend, encoding)
        publisher = Publisher(self.base.broker_url, queue)
        worker = self._worker(queue, length_batching)
        try:
            publisher.fill(producer.message(i, row) for i, row in zip(ids, rows, strict=True))
            worker.start(wait=False)
            last = [0.0]

            def progress(done: int) -> None:
                if time.monotonic() - last[0] >= 2.0 or done == len(ids):
                    last[0] = time.monotonic()
                    self.say(f"{label}: {done:,}/{len(ids):,} results stored")

            wait_all_stored(self.backend, ids, on_progress=progress, alive=lambda: worker.proc.poll() is None)
            times, failed = read_done_times(self.backend, ids)
            used = self._usage(ids)
        except Exception:
            self.say(f"{label} failed; worker log tail:\n{worker.log()[-3000:]}")
            raise
        finally:
            worker.stop()
            self.backend.delete(*(RESULT_KEY_PREFIX + i for i in ids))
            publisher.delete()
            publisher.close()
        rate, seconds, _ = drain_rate(times)
        result = {
            "mode": "drain",
            "formation": "length" if length_batching else "fifo",
            "encoding": encoding,
            "n": len(rows),
            "failed": failed,
            "rate": rate,
            "seconds": seconds,
            **used,
        }
        self.say(
            f"{label}: {rate:,.0f} req/s, padding {used['padding_share']:.1%}, mean batch {used['mean_batch']:.1f}"
        )
        return result

    def _usage(self, ids: Sequence[str]) -> dict[str, float]:
        """Padding share of computed tokens and the mean batch size, from every result's ``batch`` metadata."""
        real = padded = 0
        sizes: list[int] = []
        for start in range(0, len(ids), 2000):
            for raw in self.backend.mget([RESULT_KEY_PREFIX + i for i in ids[start : start + 2000]]):
                used = (json.loads(raw).get("result") or {}).get("batch") if raw else None
                if isinstance(used, dict):
                    real += used["tokens"]
                    padded += used["padded_tokens"]
                    sizes.append(used["size"])
        return {
            "real_tokens": real,
            "padded_tokens": padded,
            "padding_share": 1 - real / padded if padded else 0.0,
            "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        }

    def open_loop(
        self,
        rows: Sequence[np.ndarray],
        rate: float,
        duration: float,
        *,
        length_batching: bool,
        deadline_every: int = DEADLINE_EVERY,
        deadline_ms: float = DEADLINE_MS,
    ) -> dict:
        """Poisson arrivals at ``rate`` req/s for ``duration`` s (after 1 s of warm-up); latency percentiles, of all
        requests and of those that carried a deadline (every ``deadline_every``-th, due ``deadline_ms`` after it
        was built), with how many of those missed it (answered late, or refused as unable to make it)."""
        run = "o" + uuid.uuid4().hex[:10]
        queue = f"{self.base.namespace}.{run}"
        producer = Producer(self.base.broker_url, self.base.result_backend, "json")
        publisher = Publisher(self.base.broker_url, queue)
        worker = self._worker(queue, length_batching)
        counter = itertools.count()
        prefix = f"{run}-"
        lr = None
        try:
            worker.start()
            due: set[str] = set()

            def make(task_id: str) -> TaskMessage:
                i = next(counter)
                if deadline_every and i % deadline_every == 0:
                    due.add(task_id)
                    return producer.message(task_id, rows[i % len(rows)], int(1000 * time.time() + deadline_ms))
                return producer.message(task_id, rows[i % len(rows)])

            lr = LatencyRun(publisher, make, self.base.result_backend, prefix)
            achieved = lr.open(rate, duration, warmup=1.0)
        finally:
            if lr is not None:
                lr.close()
                self.backend.delete(*(f"{RESULT_KEY_PREFIX}{prefix}{i:08d}" for i in range(lr.n_sent)))
            worker.stop()
            publisher.delete()
            publisher.close()
        summary = latency_summary(lr.latencies)
        deadlines = deadline_summary([a for a in lr.answers if a[0] in due], deadline_ms)
        formation = "length" if length_batching else "fifo"
        self.say(
            f"text open loop at {rate:,.0f} req/s ({formation}): p50 {summary.get('p50_ms', 0):.1f} / "
            f"p99 {summary.get('p99_ms', 0):.1f} ms, {lr.failed} not served; with a {deadline_ms:.0f} ms deadline: "
            f"{deadlines['n']} requests, p99 {deadlines.get('p99_ms', 0):.1f} ms, {deadlines['missed']} missed"
        )
        return {
            "mode": "open",
            "formation": formation,
            "offered_rate": rate,
            "rate": achieved,
            **summary,
            "deadline": deadlines,
        }


def deadline_summary(answers: Sequence[tuple[str, float, bool]], deadline_ms: float) -> dict[str, Any]:
    """Latency of the requests that carried a deadline, against it.

    Args:
        answers: (task id, latency s, served) of each such request in the measured window.
        deadline_ms: how long after it was sent each was due.

    Returns:
        ``n``, ``deadline_ms``, the latency percentiles (``p50_ms``, ``p99_ms``, ...), ``p99_over_deadline``,
        ``late`` (served after its deadline), ``refused`` (not served: revoked as unable to make it, or failed) and
        ``missed`` (both).
    """
    served = [latency for _, latency, ok in answers if ok]
    late = sum(1000 * latency > deadline_ms for latency in served)
    refused = len(answers) - len(served)
    summary = latency_summary([latency for _, latency, _ in answers])
    p99 = summary.get("p99_ms")
    return {
        "n": len(answers),
        "deadline_ms": deadline_ms,
        **summary,
        "p99_over_deadline": p99 / deadline_ms if p99 is not None else None,
        "late": late,
        "refused": refused,
        "missed": late + refused,
    }


def run(
    brokers: dict[str, str],
    settings: Settings,
    *,
    n: int = 3000,
    max_batch_size: int = 64,
    max_tokens: int = 16384,
    duration: float = 5.0,
    open_share: float = 0.7,
    out: Path = Path("docs/benchmarks"),
    tag: str = "",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every run of the text workload on each of ``brokers`` (name -> URL); writes text{tag}.json / .png."""
    rows = draw_rows(n)
    lengths = [len(r) for r in rows]
    say(
        f"text workload: {n:,} requests, lengths 8-512 (median {np.median(lengths):.0f}, "
        f"p99 {np.percentile(lengths, 99):.0f})"
    )
    raw = {
        f: raw_forward(rows, max_batch_size=max_batch_size, max_tokens=max_tokens, by_length=f == "length")
        for f in ("length", "fifo")
    }
    say(f"raw forward pass, same batches: {raw['length']:,.0f} req/s length-aware, {raw['fifo']:,.0f} FIFO")
    report: dict[str, Any] = {
        "n": n,
        "max_batch_size": max_batch_size,
        "max_batch_tokens": max_tokens,
        "lengths": {"median": float(np.median(lengths)), "p99": float(np.percentile(lengths, 99)), "max": max(lengths)},
        "raw_forward_rate": raw,
        "brokers": {},
    }
    ns = "bt" + uuid.uuid4().hex[:8]
    for broker, url in brokers.items():
        base = derive_settings(settings, broker_url=url, namespace=ns, torch_threads=1, device="cpu")
        store = RedisParamStore.from_settings(base)
        store.create(MODEL, make_spec("text_classifier"), seed=0, replace=True)
        bench = TextBench(base, max_batch_size=max_batch_size, max_tokens=max_tokens, say=say)
        try:
            drains = [
                bench.drain(rows, encoding="json", length_batching=True),
                bench.drain(rows, encoding="b64", length_batching=True),
                bench.drain(rows, encoding="json", length_batching=False),
            ]
            fifo_rate = drains[2]["rate"]
            # ABBA: a drift of the shared machine's load over the four runs falls on both formations alike
            opens = [
                bench.open_loop(rows, open_share * fifo_rate, duration, length_batching=on)
                for on in (False, True, True, False)
            ]
        finally:
            store.delete(MODEL)
        runs = drains + opens
        p99 = {f: [r["p99_ms"] for r in opens if r["formation"] == f and "p99_ms" in r] for f in ("length", "fifo")}
        ratios = {
            "length_over_fifo": drains[0]["rate"] / fifo_rate if fifo_rate else None,
            "p99_length_over_fifo": float(np.mean(p99["length"]) / np.mean(p99["fifo"])) if all(p99.values()) else None,
            "length_over_raw": drains[0]["rate"] / raw["length"],
            "b64_over_json": drains[1]["rate"] / drains[0]["rate"] if drains[0]["rate"] else None,
        }
        # requests with a deadline, both runs of a formation together: how many, how many missed, the worse p99
        for f in ("length", "fifo"):
            theirs = [r["deadline"] for r in opens if r["formation"] == f]
            ratios[f"deadline_{f}"] = {
                "n": sum(d["n"] for d in theirs),
                "missed": sum(d["missed"] for d in theirs),
                "p99_over_deadline": max((d["p99_over_deadline"] or 0.0 for d in theirs), default=None),
            }
        report["brokers"][broker] = {"runs": runs, "ratios": ratios}
        say(
            f"{broker}: length-aware / FIFO {ratios['length_over_fifo']:.2f}x, end to end / raw "
            f"{ratios['length_over_raw']:.0%}, padding {drains[0]['padding_share']:.1%} (FIFO "
            f"{drains[2]['padding_share']:.1%}), open-loop p99 length-aware / FIFO "
            f"{ratios['p99_length_over_fifo'] or 0:.2f}; deadline requests missed "
            + ", ".join(
                f"{f} {ratios[f'deadline_{f}']['missed']}/{ratios[f'deadline_{f}']['n']} (p99 "
                f"{ratios[f'deadline_{f}']['p99_over_deadline'] or 0:.2f}x the deadline)"
                for f in ("length", "fifo")
            )
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"text{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"text{tag}.png")
    say(f"written {out / f'text{tag}.json'}, {out / f'text{tag}.png'}")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and padding share per broker and formation, beside the raw forward pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(12, 3.8))
    names, rates, pads, p99s, p99_names, p99_due = [], [], [], [], [], []
    for broker, data in report["brokers"].items():
        for r in data["runs"]:
            if r["mode"] == "drain":
                names.append(f"{broker}\n{r['formation']} {r['encoding']}")
                rates.append(r["rate"])
                pads.append(100 * r["padding_share"])
            else:  # each formation runs twice (ABBA): number the bars
                label = f"{broker}\n{r['formation']}"
                p99_names.append(f"{label} #{1 + sum(n.startswith(label) for n in p99_names)}")
                p99s.append(r.get("p99_ms", 0.0))
                p99_due.append(r.get("deadline", {}).get("p99_ms", 0.0))
    colors = ["#2a7" if "length" in n else "#c44" for n in names]
    left.bar(names, rates, color=colors)
    for formation, style in (("length", "-"), ("fifo", ":")):
        left.axhline(report["raw_forward_rate"][formation], color="#333", linestyle=style, label=f"raw {formation}")
    left.set_ylabel("requests / s (drain)")
    left.legend(fontsize=7)
    mid.bar(names, pads, color=colors)
    mid.axhline(15, color="#333", linestyle="--", linewidth=0.8)
    mid.set_ylabel("padding, % of computed tokens")
    x = np.arange(len(p99_names))
    right.bar(x - 0.2, p99s, 0.4, color=["#2a7" if "length" in n else "#c44" for n in p99_names], label="all")
    right.bar(x + 0.2, p99_due, 0.4, color="#999", label="with a deadline")
    right.axhline(DEADLINE_MS, color="#333", linestyle="--", linewidth=0.8, label=f"deadline {DEADLINE_MS:.0f} ms")
    right.set_xticks(x, p99_names)
    right.set_ylabel("p99 latency, ms (open loop)")
    right.legend(fontsize=7)
    for ax in (left, mid, right):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        f"text: {report['n']:,} requests, lengths 8-512 (median {report['lengths']['median']:.0f}), "
        f"max_batch_size {report['max_batch_size']}, max_batch_tokens {report['max_batch_tokens']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
