"""``make demo`` leaves nothing behind that the README's next steps collide with: its own model name, its dataset
removed, its worker's log removed (agent_workers/tools/demo.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from agent_workers.config import Settings
from agent_workers.tools import demo
from tests.conftest import _cleanup, pool_env

pytestmark = pytest.mark.integration


def test_demo_uses_its_own_names_and_removes_what_it_made(
    redis_up: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = pool_env("redis")
    for name, value in env.items():  # the demo's worker reads the environment, as under make demo
        monkeypatch.setenv(name, value)
    settings = Settings.from_env(env)
    params = redis.Redis.from_url(settings.params_url)
    try:
        params.set(f"{settings.namespace}:test:marker", 1)  # a key of the user's own, which must stay
        result = demo.run(settings, epochs=1, progress=False)
        printed = capsys.readouterr().out
        assert result.version >= 1  # trained (group commits: fewer versions than steps) and served
        (log,) = re.findall(r"starting a worker \(log: (\S+)\)", printed)
        assert not Path(log).exists(), "the worker's log stays behind in the temp directory"
        left = sorted(k.decode() for k in params.scan_iter(match=f"{settings.namespace}:*"))
        assert left == [f"{settings.namespace}:test:marker"], left  # no dataset (7 days) nor model left over
        assert "seed-linear" not in printed  # the README's next step creates seed-linear
    finally:
        _cleanup(settings)
