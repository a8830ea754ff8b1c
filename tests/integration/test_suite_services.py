"""The suite can share a Redis: the services it uses come from AW_TEST_REDIS_URL, AW_TEST_REDIS_DBS and
AW_TEST_AMQP_URL (README, "Running the tests"), for the tests themselves and the workers they start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from agent_workers.tools.supervisor import LocalRedis

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: A store test, a CLI test and a worker test (the session pool): each must talk to the Redis it is given.
SELECTED = [
    "tests/integration/test_params.py::test_commit_outcomes_committed_conflict_duplicate",
    "tests/integration/test_cli.py::test_models_history_all_is_every_record_and_limit_still_caps_it",
    "tests/integration/test_docs.py::test_readme_inspect_models_output_has_the_replys_shape[redis]",
]


def test_the_suite_runs_against_the_redis_and_databases_it_is_given(redis_up: None, tmp_path: Path) -> None:
    own = LocalRedis().start()
    try:
        env = dict(os.environ, AW_TEST_REDIS_URL=f"redis://127.0.0.1:{own.port}", AW_TEST_REDIS_DBS="3,4,5")
        env.pop("PYTEST_ADDOPTS", None)
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTED],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert "3 passed" in out.stdout, out.stdout[-2000:]
        stats = redis.Redis(port=own.port).info("commandstats")
        # The store's commits (EVALSHA) and the worker's pops (EVALSHA of the pop script) reached this server,
        # on the databases given (SELECT 3, 4 and 5 on connect): the shared Redis was not used.
        assert stats["cmdstat_evalsha"]["calls"] > 10 and stats["cmdstat_select"]["calls"] > 3, stats
    finally:
        own.stop()
