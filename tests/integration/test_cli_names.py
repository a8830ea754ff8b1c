"""CLI hygiene (issue 22 finding 7): ``--limit`` at least 1, one name rule for models and datasets, and names escaped
on output so a stored name cannot write control sequences to an operator's terminal. Real Redis, no worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent_workers.cli import main
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from tests.conftest import pool_env

pytestmark = pytest.mark.integration


@pytest.fixture
def env(redis_up: None) -> Iterator[dict[str, str]]:
    env = pool_env("redis")
    yield env
    store = RedisParamStore.from_settings(Settings.from_env(env))
    keys = list(store.client.scan_iter(match=f"{env['AGENT_WORKERS_NAMESPACE']}:*", count=1000))
    if keys:
        store.client.delete(*keys)


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def test_history_limit_must_be_at_least_one(env: dict[str, str]) -> None:
    assert run(env, "models", "create", "m", "--config", '{"in_features": 2}')[0] == 0
    for bad in ("0", "-5"):
        code, out = run(env, "models", "history", "m", "--limit", bad)
        assert code == 2 and "--limit" in out and "x>=1" in out
    code, out = run(env, "models", "history", "m", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 1


def test_names_with_control_characters_are_refused_and_stored_ones_are_escaped(
    env: dict[str, str], tmp_path: Path
) -> None:
    code, out = run(env, "models", "create", "evil\x1b[2J\rname")
    assert code == 1 and "model name" in out and "\x1b" not in out and "\\x1b" in out
    table = tmp_path / "d.npz"
    np.savez(table, x=np.ones((3, 2)), y=np.ones(3))
    for bad in ("a{b}", "a\x1bb"):
        code, out = run(env, "datasets", "upload", bad, str(table))
        assert code == 1 and "dataset name" in out and "\x1b" not in out
    # A model named before names were checked: list prints it escaped.
    store = RedisParamStore.from_settings(Settings.from_env(env))
    store.create("plain", make_spec("linear", in_features=2))
    raw = "old\x1b]0;owned\x07"
    for kind in ("spec", "head", "history"):
        store.client.rename(getattr(store.keys, kind)("plain"), getattr(store.keys, kind)(raw))
    store.client.srem(store.keys.models(), "plain")
    store.client.sadd(store.keys.models(), raw)
    code, out = run(env, "models", "list")
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "old\\x1b]0;owned\\x07" in out
