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
