"""The worker's malloc tuning (agent_workers/worker/allocator.py): a CNN's forward pass in a thread of its own (where
the worker computes) stops paying minor page faults for its activations on every batch."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from agent_workers.config import Settings

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Minor page faults per batch of a CNN's forward pass in a non-main thread, after three warm-up batches.
FAULTS = """
import json, resource, sys, threading
import torch
from agent_workers.tools.image_cnn import BenchCNN
from agent_workers.worker import allocator
torch.set_num_threads(1)
tuned = allocator.tune() if sys.argv[1] == "tune" else False
model = BenchCNN(10, channels=(32, 64, 64)).eval()
pixels = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8)
faults = []
def run():
    with torch.inference_mode():
        for _ in range(3):
            model(pixels)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(10):
            model(pixels)
        faults.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 10)
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(json.dumps({"tuned": tuned, "faults": faults[0]}))
"""


def _faults(mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_malloc_keeps_a_compute_threads_activations_mapped() -> None:
    untuned, tuned = _faults("default"), _faults("tune")
    assert tuned["tuned"] is True and untuned["tuned"] is False
    if untuned["faults"] < 50:
        pytest.skip(f"this glibc faults only {untuned['faults']} times a batch untuned: nothing to win here")
    assert tuned["faults"] < untuned["faults"] / 4, (tuned, untuned)


def test_tune_is_idempotent() -> None:
    from agent_workers.worker import allocator

    assert allocator.tune() is True
    assert allocator.tune() is True


def test_the_setting_turns_it_off() -> None:
    assert Settings.from_env({}).malloc_tuning is True
    assert Settings.from_env({"AGENT_WORKERS_MALLOC_TUNING": "0"}).malloc_tuning is False
