"""AGENT_WORKERS_PLUGINS names a module of the directory a command runs in, as ``celery -A tasks`` does: a console
script (``.venv/bin/agent-workers``) does not have the current directory on ``sys.path``, ``python -m`` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_workers.errors import ConfigError
from agent_workers.models import load_plugins

ROOT = Path(__file__).resolve().parents[2]


def run_script(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` as a console script runs it: sys.path[0] is the script's folder, not the current directory."""
    script = cwd / "bin" / "entry.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's package; the current directory is another one
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_a_plugin_in_the_current_directory_is_imported_without_pythonpath(tmp_path: Path) -> None:
    (tmp_path / "my_plugin_i20c.py").write_text(
        "from agent_workers import register_architecture\n"
        "@register_architecture('cwd_arch_i20c')\n"
        "def build(**config):\n    import torch\n    return torch.nn.Linear(2, 1)\n"
    )
    code = (
        "from agent_workers.models import architectures, load_plugins\n"
        "load_plugins(['my_plugin_i20c'])\nprint('cwd_arch_i20c' in architectures())\n"
    )
    out = run_script(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_a_plugin_that_cannot_be_imported_is_named() -> None:
    with pytest.raises(ConfigError, match="'no_such_plugin_i20c', which cannot be imported"):
        load_plugins(["no_such_plugin_i20c"])
