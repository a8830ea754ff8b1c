"""The Grafana dashboard and the KEDA example in docs/ops/ query only metrics a live worker exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from agent_workers.models import make_spec
from tests.conftest import Pool, unique

pytestmark = pytest.mark.integration

OPS = Path(__file__).resolve().parents[2] / "docs" / "ops"
METRIC = re.compile(r"\bagent_workers_[a-z0-9_]+")


def _queried() -> set[str]:
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    names = {name for expr in exprs for name in METRIC.findall(expr)}
    names |= set(METRIC.findall((OPS / "keda-scaledobject.yaml").read_text()))
    assert len(names) >= 8, names
    return names


def _exported(pool: Pool) -> set[str]:
    text = requests.get(f"http://127.0.0.1:{pool.metrics_port}/metrics", timeout=5).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_metric_the_dashboard_queries_exists_on_a_live_worker(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, result_cache_size=8)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    pool.client.predict(model, [1.0, 2.0], timeout=30)
    late = pool.client.app.send_task(
        "agent_workers.predict", args=[model, [1.0, 2.0]], kwargs={"deadline_ms": int((time.time() - 5) * 1000)}
    )
    late.get(timeout=30, propagate=False)  # a shed request: the shed counter has a sample
    wanted = _queried()
    give_up = time.monotonic() + 30  # the queue depth is sampled every 5 s
    missing = wanted - _exported(pool)
    while missing and time.monotonic() < give_up:
        time.sleep(0.2)  # noqa: sleep-ok - poll interval of a deadline-bounded wait
        missing = wanted - _exported(pool)
    assert not missing, f"the dashboard queries metrics no worker exports: {sorted(missing)}"
