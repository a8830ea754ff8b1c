"""README.md is executable: its ```python blocks, and the shell lines of "Training from your app", run as written
against a real worker on both brokers in a namespaced deployment (queue names from AGENT_WORKERS_*_QUEUE)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent_workers.models import make_spec
from agent_workers.worker.launch import settings_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def shell(line: str) -> str:
    """A README shell line, with this checkout's interpreter for ``.venv/bin``."""
    return re.sub(
        r"(?<![\w/])\.venv/bin/(agent-workers|python)\b",
        lambda m: f"{sys.executable} -m agent_workers" if m.group(1) == "agent-workers" else sys.executable,
        line,
    )


def test_readme_has_a_tested_training_example() -> None:
    training = section("Training from your app")
    assert any("on_progress" in b and "upload_dataset" in b for b in blocks(training, "python"))
    assert any("datasets upload" in b and "agent-workers fit" in b for b in blocks(training, "bash"))


def test_readme_code_runs_as_written(broker: str, start_pool, tmp_path: Path) -> None:
    pool = start_pool(broker)
    pool.store.create("house", make_spec("linear", in_features=3))
    env = settings_env(pool.env)
    for block in blocks(section("Training from your app"), "bash"):
        for line in block.splitlines():
            if line.strip():
                out = subprocess.run(
                    ["bash", "-c", shell(line)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
                )
                assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
    assert pool.store.head("seed-linear").version == 900  # the CLI's fit: 10 epochs of 90 steps
    for block in blocks(README.read_text(), "python"):
        out = subprocess.run(
            [sys.executable, "-c", block], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, f"{block}\n{out.stdout}\n{out.stderr}"
