"""The text benchmark's drain, small, on both brokers: bare Celery messages in, throughput and the padding share
read back from every result's ``batch`` metadata (agent_workers/tools/bench/text.py)."""

from __future__ import annotations

import pytest

from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.bench import text
from tests.conftest import _cleanup, pool_env

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("length_batching", [True, False])
def test_a_text_drain_counts_every_token_of_every_request(broker: str, length_batching: bool) -> None:
    settings = Settings.from_env(pool_env(broker, torch_threads=1))
    RedisParamStore.from_settings(settings).create(text.MODEL, make_spec("text_classifier", layers=1))
    rows = text.draw_rows(48, seed=3)
    try:
        bench = text.TextBench(settings, max_batch_size=16, max_tokens=1024, say=lambda _line: None)
        result = bench.drain(rows, encoding="b64", length_batching=length_batching)
    finally:
        _cleanup(settings)
    assert result["failed"] == 0 and result["rate"] > 0
    assert result["real_tokens"] == sum(len(r) for r in rows)
    assert result["padded_tokens"] >= result["real_tokens"]
    assert 1 <= result["mean_batch"] <= 16


def test_the_open_loop_counts_requests_that_missed_their_deadline() -> None:
    # every other request is due 1 s before it is sent: the worker refuses each of those unserved, and the
    # benchmark must count each as missed; the rest are served
    settings = Settings.from_env(pool_env("redis", torch_threads=1))
    RedisParamStore.from_settings(settings).create(text.MODEL, make_spec("text_classifier", layers=1))
    rows = text.draw_rows(32, seed=4)
    try:
        bench = text.TextBench(settings, max_batch_size=16, max_tokens=1024, say=lambda _line: None)
        run = bench.open_loop(rows, 40.0, 1.0, length_batching=True, deadline_every=2, deadline_ms=-1000.0)
    finally:
        _cleanup(settings)
    due = run["deadline"]
    assert due["n"] >= 5 and due["refused"] == due["n"] == due["missed"] and due["late"] == 0
    assert run["count"] > due["n"]  # the requests without a deadline were answered too
