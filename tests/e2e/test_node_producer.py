"""A Node.js application calls ``agent_workers.predict`` by name (examples/node, celery-ts) on both brokers and gets the
numbers the Python client gets; a bad row fails alone with the documented error payload."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent_workers.models import make_spec
from tests.conftest import Pool, unique

pytestmark = pytest.mark.e2e


def run_node(
    producer: Path, pool: Pool, model: str, rows: list[Any], *options: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_WORKERS_")}
    env.update(pool.env)  # broker, result backend and inference queue of this pool
    return subprocess.run(
        ["node", str(producer), *options, model, json.dumps(rows), "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=producer.parent,
    )


def test_node_producer_gets_the_same_numbers_as_the_python_client(pool: Pool, node_producer: Path) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=5), seed=6)
    rows = np.random.default_rng(7).standard_normal((12, 5)).round(4).tolist()
    out = run_node(node_producer, pool, model, rows)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["status"] for r in results] == ["SUCCESS"] * len(rows)
    expected = pool.client.predict_bulk(model, rows, timeout=60)
    np.testing.assert_allclose(
        [r["result"]["outputs"] for r in results], [e["outputs"] for e in expected], rtol=1e-5, atol=1e-6
    )
    assert {r["result"]["version"] for r in results} == {0}


def test_node_producer_sees_a_bad_row_fail_alone(pool: Pool, node_producer: Path) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=3))
    out = run_node(node_producer, pool, model, [[1.0, 2.0, 3.0], [1.0, 2.0], [0.0, 0.0, 0.0]])
    assert out.returncode == 1, out.stderr  # some failed
    good, bad, other = json.loads(out.stdout)
    assert good["status"] == other["status"] == "SUCCESS"
    assert bad["status"] == "FAILURE"
    assert bad["result"] == {
        "exc_type": "InputError",
        "exc_message": ["inputs must have shape [3], got length 2"],
        "exc_module": "agent_workers.errors",
    }


def test_node_producer_sends_uint8_images_as_typed_tensors(
    broker: str,
    start_pool: Any,
    node_producer: Path,
) -> None:
    pool = start_pool(broker, queues="inference", plugins="tests.plugins_tensors")
    model = unique("cnn")
    pool.store.create(model, make_spec("tiny_cnn"), seed=4)  # uint8 pixels [3, 8, 8]
    images = np.random.default_rng(8).integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    rows = [image.ravel().tolist() for image in images] + [list(range(191))]  # the last one pixel short
    out = run_node(node_producer, pool, model, rows, "--uint8", "3,8,8")
    assert out.returncode == 1, out.stderr  # the short one failed
    *good, short = json.loads(out.stdout)
    assert [r["status"] for r in good] == ["SUCCESS"] * 3
    expected = pool.client.predict_bulk(model, images, timeout=60)  # the Python client's numpy path
    np.testing.assert_allclose(
        [r["result"]["outputs"] for r in good], [e["outputs"] for e in expected], rtol=1e-5, atol=1e-6
    )
    assert short["status"] == "FAILURE" and short["result"]["exc_type"] == "InputError"
    assert "takes 192 bytes; b64 carries 191" in short["result"]["exc_message"][0]
