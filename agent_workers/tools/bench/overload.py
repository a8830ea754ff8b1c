"""The overload run: Poisson arrivals at twice what one worker drains, mixed priorities, a deadline on every request.

A compute-bound model (``wide``: 64 → 6144 → 6144 → 10, small messages, ~1 ms of forward pass per row on one CPU
thread) is served by one worker; first a drain of ours measures its saturation rate, then requests arrive at
``factor`` × that rate for ``duration`` seconds (after a warm-up). A ``high_share`` of them are urgent (the broker's
highest priority: 9 on RabbitMQ, 0 on kombu's Redis transport) with a deadline ``high_budget`` after they are sent,
the rest low priority with ``low_budget``. Both budgets are multiples of the p99 bound the latency runs use
(``max_wait + 3 × batch compute + 10 ms``), so the deadline is never what keeps the high-priority p99 in bound.

Measured from outside: each request's latency (its intended send time to its record being published), its final
state, and whether an answer came after its deadline (the record's ``date_done`` against ``deadline_ms``; the
producer and the worker share this machine's clock). The goals: high-priority p99 within the bound, ≥ 99 % of the
high-priority requests answered, and no request answered after its deadline.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from agent_workers.client.results import ResultListener
from agent_workers.contract import PREDICT
from agent_workers.tools.bench.latency import cdf_points, latency_bound_ms
from agent_workers.tools.bench.measure import batch_stats, scrape_metrics
from agent_workers.tools.bench.messages import Publisher
from agent_workers.tools.bench.output import say
from agent_workers.tools.stats import percentile
from agent_workers.wire import TaskMessage

#: The overload run's model (workloads.WORKLOADS): compute-bound, so shedding saves forward passes, not messaging.
WORKLOAD = "wide"
QUEUE_MAX_PRIORITY = 10  # RabbitMQ's recommended ceiling
HIGH_BUDGET_BOUNDS = 4.0  # a high-priority request's deadline, in p99 bounds after it is sent
LOW_BUDGET_BOUNDS = 1.5


class PriorityMessages:
    """Predict messages with a ``deadline_ms`` keyword and a ``priority`` property, each with fresh random inputs,
    as ``send_task(PREDICT, kwargs={"model", "inputs", "deadline_ms"}, priority=...)`` sends them; the headers come
    from the app's ``as_task_v2`` once, the body is written per message."""

    def __init__(self, amqp: Any, model: str, in_features: int, seed: int = 11) -> None:
        kwargs = {"model": model, "inputs": [0.0] * in_features, "deadline_ms": 0}
        headers, properties, body, _ = amqp.as_task_v2("0", PREDICT, args=(), kwargs=kwargs)
        self.headers, self.properties = headers, dict(properties)
        self.embed = body[2]
        self.model, self.in_features = model, in_features
        self.rng = np.random.default_rng(seed)

    def __call__(self, task_id: str, deadline_ms: int, priority: int) -> TaskMessage:
        kwargs = {"model": self.model, "inputs": self.rng.standard_normal(self.in_features), "deadline_ms": deadline_ms}
        body = orjson.dumps([[], kwargs, self.embed], option=orjson.OPT_SERIALIZE_NUMPY)
        return TaskMessage(
            task_id,
            {**self.headers, "id": task_id, "root_id": task_id, "kwargsrepr": f"{{'deadline_ms': {deadline_ms}}}"},
            {**self.properties, "correlation_id": task_id, "priority": priority},
            body,
        )


def urgent_priority(broker: str) -> tuple[int, int]:
    """(high, low) priority property values as the broker orders them: RabbitMQ serves higher first, kombu's
    Redis transport lower first."""
    return (0, 9) if broker == "redis" else (9, 0)


class _Heard:
    """Result records heard on the backend's channel: (time heard, state, date_done as epoch seconds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: dict[str, tuple[float, str, float | None]] = {}
        self.twice = 0
        self.reasons: dict[str, int] = {}  # why requests were REVOKED (the reason's words before any figure)

    def __call__(self, task_id: str, record: bytes) -> None:
        now = time.time()
        try:
            meta = orjson.loads(record)
            state = str(meta.get("status"))
            done = meta.get("date_done")
            done_at = datetime.fromisoformat(done).timestamp() if isinstance(done, str) else None
        except (orjson.JSONDecodeError, ValueError, AttributeError):
            state, done_at = "?", None
        why = _reason(meta) if state == "REVOKED" else None
        with self.lock:
            if why is not None:
                self.reasons[why] = self.reasons.get(why, 0) + 1
            if task_id in self.first:
                self.twice += 1
            else:
                self.first[task_id] = (now, state, done_at)


def _reason(meta: Any) -> str:
    """The words of a REVOKED record's reason up to its first figure ('deadline cannot be met: predicted done in')."""
    result = meta.get("result") if isinstance(meta, dict) else None
    text = str(result.get("exc_message", result) if isinstance(result, dict) else result)
    return text.split(":")[0].strip("[]'\" ")[:80]


def run_overload(
    runs: Any,
    session: Any,
    *,
    saturation: float,
    batch_ms: float,
    factor: float,
    high_share: float,
    duration: float,
    warmup: float = 1.0,
) -> dict[str, Any]:
    """Offer ``factor`` × ``saturation`` req/s of mixed priorities to a fresh worker; returns the figures."""
    cfg = runs.cfg
    bound = latency_bound_ms(cfg.max_wait_ms, batch_ms)
    budgets = {"high": HIGH_BUDGET_BOUNDS * bound, "low": LOW_BUDGET_BOUNDS * bound}
    rate = factor * saturation
    label = f"{session.broker}/{session.workload.name} overload at {rate:,.0f} req/s ({factor:g}x the drain rate)"
    run = "o" + uuid.uuid4().hex[:10]
    queue_name = f"{session.namespace}.{run}"
    # RabbitMQ orders by priority only in a queue declared with x-max-priority (AGENT_WORKERS_QUEUE_MAX_PRIORITY);
    # the worker and this producer declare it alike. kombu's Redis transport keeps priority sub-lists anyway.
    max_priority = 0 if session.broker == "redis" else QUEUE_MAX_PRIORITY
    publisher = Publisher(session.broker_url, queue_name, max_priority=max_priority)
    worker, port = runs.worker(session, queue_name, cfg.max_batch_size, run, queue_max_priority=max_priority)
    make = PriorityMessages(runs.amqp, session.model, session.workload.in_features)
    priorities = dict(zip(("high", "low"), urgent_priority(session.broker), strict=True))
    heard = _Heard()
    listener = ResultListener(cfg.result_backend, heard, prefix=run)
    sent: dict[str, tuple[str, float, float]] = {}  # id -> (class, intended send time, deadline)
    rng = np.random.default_rng(3)
    try:
        worker.start()
        before = scrape_metrics(port)
        start = time.time()
        window = (start + warmup, start + warmup + duration)
        due, i, last_line = start, 0, start
        while due < window[1]:
            due += float(rng.exponential(1.0 / rate))
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            cls = "high" if rng.random() < high_share else "low"
            deadline = due + budgets[cls] / 1000.0
            task_id = f"{run}-{i:08d}"
            i += 1
            sent[task_id] = (cls, due, deadline)
            publisher.send(make(task_id, int(deadline * 1000), priorities[cls]))
            if time.time() - last_line >= 2.0:
                last_line = time.time()
                say(f"{label}: {i:,} sent, {len(heard.first):,} answered")
        give_up = time.monotonic() + 120
        while len(heard.first) < len(sent) and time.monotonic() < give_up:
            time.sleep(0.05)
        metrics = scrape_metrics(port)
    except Exception:
        say(f"{label} failed; worker log tail:\n{worker.log()[-3000:]}")
        raise
    finally:
        worker.stop()
        listener.close()
        runs.forget(list(sent))
        publisher.delete()
        publisher.close()
    result = summarise(sent, heard.first, window, bound=bound, budgets=budgets)
    result.update(
        system="ours",
        broker=session.broker,
        workload=session.workload.name,
        saturation_rate=saturation,
        factor=factor,
        offered_rate=rate,
        high_share=high_share,
        queue_max_priority=max_priority,
        answered_twice=heard.twice,
        revoked_because=heard.reasons,
        shed_before_compute=metrics.get("agent_workers_shed_total", 0.0) - before.get("agent_workers_shed_total", 0.0),
        **batch_stats(before, metrics),
    )
    high = result["classes"]["high"]
    say(
        f"{label}: high p99 {high.get('p99_ms', float('nan')):.1f} ms (bound {bound:.1f}), "
        f"{high['answered_share']:.1%} of high answered; low answered {result['classes']['low']['answered_share']:.1%}"
        f"; {result['late_answers']} answered after their deadline; revoked because {heard.reasons}"
    )
    return result


def summarise(
    sent: dict[str, tuple[str, float, float]],
    heard: dict[str, tuple[float, str, float | None]],
    window: tuple[float, float],
    *,
    bound: float,
    budgets: dict[str, float],
) -> dict[str, Any]:
    """Per class (high, low): requests sent in the measured window, their final states, latency percentiles over
    all of them (an answer is an answer: REVOKED comes back too) and over SUCCESS alone; answers after deadline."""
    classes: dict[str, dict[str, Any]] = {}
    late = 0
    unanswered = 0
    for cls in ("high", "low"):
        latencies: list[float] = []
        served: list[float] = []
        states: dict[str, int] = {}
        n = 0
        for task_id, (c, due, deadline) in sent.items():
            if c != cls or not window[0] <= due < window[1]:
                continue
            n += 1
            answer = heard.get(task_id)
            if answer is None:
                unanswered += 1
                continue
            at, state, done_at = answer
            states[state] = states.get(state, 0) + 1
            latencies.append(1000 * (at - due))
            if state == "SUCCESS":
                served.append(1000 * (at - due))
                if done_at is not None and done_at > deadline:
                    late += 1
        entry: dict[str, Any] = {
            "sent": n,
            "states": states,
            "budget_ms": budgets[cls],
            "answered_share": states.get("SUCCESS", 0) / n if n else 0.0,
            "revoked_share": states.get("REVOKED", 0) / n if n else 0.0,
        }
        if latencies:
            entry.update({f"p{q}_ms": percentile(latencies, q) for q in (50, 99)})
            entry["cdf"] = cdf_points([ms / 1000 for ms in latencies])
        if served:
            entry.update({f"success_p{q}_ms": percentile(served, q) for q in (50, 99)})
        classes[cls] = entry
    seconds = window[1] - window[0]
    success = sum(c["states"].get("SUCCESS", 0) for c in classes.values())
    return {
        "duration": seconds,
        "bound_ms": bound,
        "classes": classes,
        "goodput": success / seconds if seconds else 0.0,
        "late_answers": late,
        "unanswered": unanswered,
    }
