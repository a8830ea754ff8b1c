"""CUDA placement and AMP through the engine; runs only where CUDA is available (the prepared GPU check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_script_passes(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/gpu_check.py"),
            "--batch-sizes",
            "1,64",
            "--out",
            str(tmp_path / "gpu.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checks: all ok" in out.stdout


def test_gpu_check_script_dry_run_on_cpu(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/gpu_check.py"),
            "--device",
            "cpu",
            "--batch-sizes",
            "4",
            "--workloads",
            "reference-mlp",
            "--out",
            str(tmp_path / "gpu.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checks: all ok" in out.stdout and (tmp_path / "gpu.json").exists()
