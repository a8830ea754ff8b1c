"""Start-up refuses settings that cannot work, with a message that names the fix (real worker processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent_workers.config import Settings
from agent_workers.errors import ConfigError
from agent_workers.worker.app import create_app
from agent_workers.worker.bootsteps import check_app
from agent_workers.worker.launch import settings_env, worker_command
from tests.conftest import pool_env

pytestmark = pytest.mark.integration


def run_worker(env: dict[str, str], prefetch: int) -> subprocess.CompletedProcess[str]:
    cmd = worker_command(
        queues=[env["AGENT_WORKERS_INFERENCE_QUEUE"]], hostname="startup@%h", prefetch_multiplier=prefetch
    )
    return subprocess.run(cmd, env=settings_env(env), capture_output=True, text=True, timeout=120)


def test_worker_refuses_a_prefetch_that_cannot_fill_a_batch(redis_up: None) -> None:
    env = pool_env("redis", max_batch_size=64)
    out = run_worker(env, prefetch=8)
    assert out.returncode != 0
    assert "a batch can never fill" in out.stdout + out.stderr
    assert "--prefetch-multiplier 128" in out.stdout + out.stderr
    # One line that names the fix, not Celery's traceback around it.
    assert "Traceback" not in out.stdout + out.stderr
    assert [line for line in (out.stdout + out.stderr).splitlines() if "never fill" in line] == [
        "agent-workers: ConfigError: this worker prefetches 8 messages but AGENT_WORKERS_MAX_BATCH_SIZE=64, so a batch "
        "can never fill; start it with --prefetch-multiplier 128 (agent-workers worker does this)"
    ]


def test_worker_refuses_a_visibility_timeout_shorter_than_the_time_limit(redis_up: None) -> None:
    env = pool_env("redis", visibility_timeout=30, task_time_limit=60)
    out = run_worker(env, prefetch=128)
    assert out.returncode != 0
    assert "must exceed AGENT_WORKERS_TASK_TIME_LIMIT" in out.stdout + out.stderr


def test_pickle_in_accept_content_is_refused() -> None:
    app = create_app(Settings.from_env({}), accept_content=["json", "pickle"])
    with pytest.raises(ConfigError, match="Accept only json"):
        check_app(app)


def test_worker_refuses_pickle_in_accept_content(redis_up: None, tmp_path) -> None:
    # A user config module that re-enables pickle on top of ours: the worker must not start.
    (tmp_path / "unsafe_app.py").write_text(
        "from agent_workers.worker.app import create_app\napp = create_app(accept_content=['json', 'pickle'])\n"
        "import tasks.inference, tasks.training  # noqa\n"
    )
    env = settings_env(pool_env("redis"))
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    env["C_FORCE_ROOT"] = "1"  # as root, Celery itself refuses pickle first; we test our own guard
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "unsafe_app",
            "worker",
            "-P",
            "threads",
            "-c",
            "1",
            "--prefetch-multiplier",
            "128",
            "-Q",
            "nothing",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "untrusted messages could run code" in out.stdout + out.stderr


def test_worker_refuses_wait_aof_on_a_redis_that_cannot_honour_it(redis_up: None) -> None:
    # The shared Redis keeps no append-only file (and is 7.0 here), so WAITAOF cannot confirm anything.
    env = pool_env("redis", wait_aof=1)
    out = run_worker(env, prefetch=128)
    assert out.returncode != 0
    assert "WAITAOF" in out.stdout + out.stderr or "appendonly" in out.stdout + out.stderr
