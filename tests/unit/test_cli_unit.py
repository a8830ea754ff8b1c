"""The CLI's pure parts: queue roles, the per-process launch plan, file reading, misspelled settings, lazy torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest

from agent_workers.cli.tables import read_rows, read_xy
from agent_workers.cli.worker import plan, resolve_queues
from agent_workers.config import Settings, unknown_variables
from agent_workers.worker.launch import unique_node_name

NAMESPACED = Settings(namespace="prod", inference_queue="prod.inference", training_queue="prod.training")


def test_queue_roles_mean_the_configured_queues() -> None:
    assert resolve_queues(NAMESPACED, "inference") == ["prod.inference"]
    assert resolve_queues(NAMESPACED, "training,other") == ["prod.training", "other"]
    assert resolve_queues(NAMESPACED, None) == ["prod.inference", "prod.training"]


def test_default_node_names_get_their_unique_part_at_start_and_prefetch_follows_the_role() -> None:
    one = plan(NAMESPACED, queues=["prod.inference"], name=None, loglevel="INFO", devices=[], extra=[])[0]
    # No pid baked in: the printed line may run any number of times, each worker filling {unique} in as it starts.
    assert one.cmd[one.cmd.index("-n") + 1] == "prod-inference-{unique}@%h"
    assert unique_node_name("prod-inference-{unique}@%h") != unique_node_name("prod-inference-{unique}@%h")
    assert one.cmd[one.cmd.index("--prefetch-multiplier") + 1] == str(2 * NAMESPACED.batch.max_batch_size)
    trainer = plan(NAMESPACED, queues=["prod.training"], name=None, loglevel="INFO", devices=[], extra=[])[0]
    # A trainer prefetches the largest group's worth of train steps (the adaptive group's cap); with a group of 1,
    # one job at a time.
    assert trainer.cmd[trainer.cmd.index("--prefetch-multiplier") + 1] == str(NAMESPACED.train_group_max)
    fixed = dataclasses.replace(NAMESPACED, train_group=8, train_group_max=4)
    trainer = plan(fixed, queues=["prod.training"], name=None, loglevel="INFO", devices=[], extra=[])[0]
    assert trainer.cmd[trainer.cmd.index("--prefetch-multiplier") + 1] == "8"
    per_step = dataclasses.replace(NAMESPACED, train_group=1)
    trainer = plan(per_step, queues=["prod.training"], name=None, loglevel="INFO", devices=[], extra=[])[0]
    assert trainer.cmd[trainer.cmd.index("--prefetch-multiplier") + 1] == "1"


def test_every_device_process_gets_its_own_port_and_ready_file() -> None:
    settings = Settings(metrics_port=9100, ready_file="/run/ready")
    launches = plan(settings, queues=["inference"], name=None, loglevel="INFO", devices=["0", "1"], extra=[])
    assert [launch.env["AGENT_WORKERS_METRICS_PORT"] for launch in launches] == ["9100", "9101"]
    assert [launch.env["AGENT_WORKERS_READY_FILE"] for launch in launches] == ["/run/ready.0", "/run/ready.1"]
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in launches] == ["0", "1"]
    assert len({launch.cmd[launch.cmd.index("-n") + 1] for launch in launches}) == 2


def test_a_misspelled_variable_gets_the_nearest_name() -> None:
    env = {"AGENT_WORKERS_MAX_BATCHSIZE": "8", "AGENT_WORKERS_NAMESPACE": "x", "OTHER": "1"}
    assert unknown_variables(env) == [("AGENT_WORKERS_MAX_BATCHSIZE", "AGENT_WORKERS_MAX_BATCH_SIZE")]


def test_a_one_dimensional_npy_is_one_row(tmp_path: Path) -> None:
    np.save(tmp_path / "row.npy", np.array([1.0, 2.0, 3.0]))
    assert read_rows(tmp_path / "row.npy") == [[1.0, 2.0, 3.0]]


def test_a_csv_header_row_is_skipped_and_a_bad_cell_is_named(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b,y\n1,2,3\n4,5,6\n")
    x, y = read_xy(tmp_path / "t.csv")
    assert x.tolist() == [[1, 2], [4, 5]] and y.tolist() == [3, 6]
    (tmp_path / "bad.csv").write_text("1,2\n3,oops\n")
    with pytest.raises(click.ClickException, match=r"bad.csv:2 column 2: 'oops' is not a number"):
        read_rows(tmp_path / "bad.csv")


def test_commands_that_touch_no_tensor_do_not_import_torch() -> None:
    code = (
        "import sys, agent_workers.cli, agent_workers.store.params, agent_workers.training.datasets, "
        "agent_workers.client; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
