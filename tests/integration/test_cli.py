"""The ``agent-workers`` command as an operator types it: several workers per host, fake devices, datasets, fit,
predict with bad rows, and one clear line for each mistake (real processes, both brokers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from agent_workers.models import make_spec
from agent_workers.tools.supervisor import free_port
from agent_workers.worker.launch import settings_env
from tests.conftest import Pool, pool_env, unique

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 90.0


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_workers", *args],
        env=settings_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli_worker(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent_workers", "worker", *args],
            env=settings_env(env),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_files(paths: list[Path], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Block until every ready file exists; fail with the log if the process exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not ready after {READY_TIMEOUT}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)  # noqa: sleep-ok - a poll interval bounded by a deadline, not a synchronisation


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes a test started; each is stopped (SIGTERM, then SIGKILL) by pid afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_all(started)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process (a warm shutdown), then SIGKILL any still running after 60 s; by pid."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_same_worker_command_typed_twice_starts_two_workers(
    broker: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    env = pool_env(broker)
    ready = []
    for i in range(2):
        ready.append(tmp_path / f"ready{i}")
        log = tmp_path / f"worker{i}.log"
        proc = start_cli_worker("-Q", "inference", env={**env, "AGENT_WORKERS_READY_FILE": str(ready[i])}, log=log)
        procs.append(proc)
    for i, proc in enumerate(procs):
        wait_for_files([ready[i]], proc, tmp_path / f"worker{i}.log")
    names = {p.read_text() for p in ready}
    assert len(names) == 2, names  # unique node names: RabbitMQ's pidbox queue is per node name
    out = cli("status", "--timeout", "3", env=env)
    assert out.returncode == 0, out.stderr
    for name in names:
        assert f"{name}\t{env['AGENT_WORKERS_INFERENCE_QUEUE']}" in out.stdout
    assert f"{env['AGENT_WORKERS_INFERENCE_QUEUE']}\t0 waiting\t2 consumers" in out.stdout
    assert f"no worker consumes the training queue {env['AGENT_WORKERS_TRAINING_QUEUE']!r}" in out.stderr


def test_one_process_per_fake_device_each_with_its_metrics_port_and_ready_file(
    broker: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    base = free_port()
    env = pool_env(broker, metrics_port=base, ready_file=tmp_path / "ready")
    log = tmp_path / "worker.log"
    procs.append(start_cli_worker("--devices", "cpu,cpu", env=env, log=log))
    wait_for_files([tmp_path / "ready.0", tmp_path / "ready.1"], procs[0], log)
    for port in (base, base + 1):
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "agent_workers_" in text
    assert (tmp_path / "ready.0").read_text() != (tmp_path / "ready.1").read_text()
    procs[0].send_signal(signal.SIGTERM)  # forwarded to both children: a warm shutdown
    assert procs[0].wait(60) == 0


def test_the_printed_worker_command_run_twice_starts_two_workers(
    broker: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    env = pool_env(broker)
    out = cli("worker", "-Q", "inference", "--no-gpus", "--print-command", env=env)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert str(os.getpid()) not in line and "{unique}@%h" in line  # no pid of the printing process baked in
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    for i, path in enumerate(ready):
        with (tmp_path / f"worker{i}.log").open("ab") as log:
            worker_env = settings_env({**env, "AGENT_WORKERS_READY_FILE": str(path)})
            procs.append(
                subprocess.Popen(["bash", "-c", f"exec {line}"], env=worker_env, cwd=ROOT, stdout=log, stderr=log)
            )
    for i, proc in enumerate(procs):
        wait_for_files([ready[i]], proc, tmp_path / f"worker{i}.log")
    names = {p.read_text() for p in ready}
    assert len(names) == 2 and not any("{unique}" in n for n in names), names
    out = cli("status", "--timeout", "3", env=env)
    assert f"{env['AGENT_WORKERS_INFERENCE_QUEUE']}\t0 waiting\t2 consumers" in out.stdout


def test_print_command_is_what_runs_and_resolves_queue_roles(redis_up: None) -> None:
    env = pool_env("redis", max_batch_size=8)
    out = cli("worker", "-Q", "inference", "--print-command", env=env)
    assert out.returncode == 0, out.stderr
    assert f"-Q {env['AGENT_WORKERS_INFERENCE_QUEUE']} " in out.stdout
    assert "--prefetch-multiplier 16 " in out.stdout and " -l INFO " in out.stdout


def test_a_worker_on_a_queue_no_client_sends_to_warns_at_start_up(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, start=False)
    pool.worker.cmd[pool.worker.cmd.index("-Q") + 1] = "inference"  # the literal name, as old docs wrote it
    pool.worker.start()
    assert "consumes queue 'inference', which is neither AGENT_WORKERS_INFERENCE_QUEUE" in pool.worker.log()


def test_predict_with_no_consumer_names_the_queue_at_once(broker: str, tmp_path: Path) -> None:
    env = pool_env(broker)
    rows = tmp_path / "rows.json"
    rows.write_text("[[1, 2, 3]]")
    out = cli("predict", "house", str(rows), env=env)
    assert out.returncode == 1
    assert f"no worker consumes the inference queue {env['AGENT_WORKERS_INFERENCE_QUEUE']!r}" in out.stderr
    assert "agent-workers status" in out.stderr and "Traceback" not in out.stderr


def test_predict_reports_bad_rows_by_index_and_keeps_the_good_ones(pool: Pool, tmp_path: Path) -> None:
    model = unique()
    pool.store.create(model, make_spec("linear", in_features=3))
    rows = tmp_path / "rows.json"
    rows.write_text("[[1, 2, 3], [1, 2], [0.5, 0, -1]]")
    out = cli("predict", model, str(rows), env=pool.env)
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [("outputs" in line, line.get("row")) for line in lines] == [(True, None), (False, 1), (True, None)]
    assert "InputError" in lines[1]["error"]
    assert "1 of 3 rows failed (rows 1)" in out.stderr


def test_a_one_dimensional_npy_is_one_row(pool: Pool, tmp_path: Path) -> None:
    model = unique()
    pool.store.create(model, make_spec("linear", in_features=3))
    np.save(tmp_path / "row.npy", np.array([1.0, 2.0, 3.0]))
    out = cli("predict", model, str(tmp_path / "row.npy"), env=pool.env)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1


def test_datasets_from_the_cli_train_with_fit(pool: Pool, tmp_path: Path) -> None:
    model, name = unique(), unique("data")
    pool.store.create(model, make_spec("linear", in_features=2))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 2))
    table = tmp_path / "train.csv"
    table.write_text("a,b,y\n" + "".join(f"{a},{b},{a - b}\n" for a, b in x))  # a header row is skipped
    up = cli("datasets", "upload", name, str(table), "--ttl", "600", env=pool.env)
    assert up.returncode == 0, up.stderr
    assert "200 rows × 2 features" in up.stdout
    shown = json.loads(cli("datasets", "show", name, env=pool.env).stdout)
    assert shown["rows"] == 200 and shown["expires_in"].startswith("0h")
    assert name in cli("datasets", "list", env=pool.env).stdout
    fit = cli("fit", model, name, "--epochs", "2", "--batch-size", "50", env=pool.env)
    assert fit.returncode == 0, fit.stderr
    result = json.loads(fit.stdout)
    assert result["version"] == 8 and result["steps"] == 8
    assert "8/8" in fit.stderr  # the progress bar
    assert cli("datasets", "delete", name, env=pool.env).returncode == 0
    gone = cli("datasets", "show", name, env=pool.env)
    assert gone.returncode == 1 and "does not exist" in gone.stderr


def test_client_fit_and_train_report_progress(pool: Pool) -> None:
    model = unique()
    pool.store.create(model, make_spec("linear", in_features=2))
    x = np.arange(40, dtype=np.float32).reshape(20, 2) / 40
    name = pool.client.upload_dataset(None, x, x[:, 0], ttl=600)
    seen: list[dict] = []
    result = pool.client.fit(model, name, epochs=2, batch_size=2, on_progress=seen.append)
    assert result["steps"] == 20
    assert seen and seen[-1]["step"] == 20 and seen[-1]["steps"] == 20  # the last PROGRESS comes before SUCCESS
    steps: list[dict] = []
    pool.client.train(model, name, 20, epochs=1, batch_size=5, on_progress=steps.append)
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and steps[-1]["epoch"] == 1


@pytest.mark.parametrize(
    ("command", "variable", "message"),
    [
        (["status"], "AGENT_WORKERS_BROKER_URL", "cannot reach the broker or Redis"),
        (["models", "list"], "AGENT_WORKERS_PARAMS_URL", "start Redis or fix AGENT_WORKERS_PARAMS_URL"),
    ],
)
def test_an_unreachable_service_is_one_line(
    redis_up: None, command: list[str], variable: str, message: str, tmp_path: Path
) -> None:
    env = {**pool_env("redis"), variable: f"redis://127.0.0.1:{free_port()}/0"}
    out = cli(*command, env=env)
    assert out.returncode == 1
    assert message in out.stderr and variable in out.stderr and "Traceback" not in out.stderr


def test_a_bad_setting_under_celery_is_one_line(redis_up: None) -> None:
    env = settings_env({**pool_env("redis"), "AGENT_WORKERS_MAX_BATCH_SIZE": "0"})
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("agent-workers: ConfigError: AGENT_WORKERS_MAX_BATCH_SIZE=0")
    assert "Traceback" not in out.stderr


def test_a_metrics_port_in_use_is_one_line_naming_the_variable(redis_up: None) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = pool_env("redis", metrics_port=port)
        out = cli("worker", "-Q", "inference", "--no-gpus", env=env)
    assert out.returncode != 0
    assert f"AGENT_WORKERS_METRICS_PORT={port} cannot be served" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_a_misspelled_variable_is_named_with_the_nearest_one(redis_up: None) -> None:
    env = {**pool_env("redis"), "AGENT_WORKERS_MAX_BATCHSIZE": "8"}
    out = cli("worker", "--print-command", env=env)
    assert "AGENT_WORKERS_MAX_BATCHSIZE is not an agent-workers setting" in out.stderr
    assert "did you mean AGENT_WORKERS_MAX_BATCH_SIZE?" in out.stderr
    assert os.environ.get("AGENT_WORKERS_MAX_BATCHSIZE") is None


def test_models_create_knows_the_architectures_of_the_plugins(redis_up: None) -> None:
    """AGENT_WORKERS_PLUGINS is honoured by the CLI, not only by the worker (issue 20: "unknown architecture")."""
    import redis

    env = pool_env("redis", plugins="tests.plugins")
    name = unique("plugged")
    try:
        made = cli("models", "create", name, "--arch", "counter", "--config", '{"in_features": 2}', env=env)
        assert made.returncode == 0, made.stderr
        shown = cli("models", "show", name, env=env)
        assert shown.returncode == 0 and "counter" in shown.stdout, shown.stderr
        unplugged = cli(
            "models", "create", unique("plain"), "--arch", "counter", env={**env, "AGENT_WORKERS_PLUGINS": ""}
        )
        assert unplugged.returncode == 1 and "unknown architecture 'counter'" in unplugged.stderr
    finally:
        params = redis.Redis.from_url(env["AGENT_WORKERS_PARAMS_URL"])
        keys = list(params.scan_iter(match=f"{env['AGENT_WORKERS_NAMESPACE']}:*"))
        if keys:
            params.delete(*keys)


def test_an_unimportable_plugin_is_one_line_naming_the_module(redis_up: None) -> None:
    env = pool_env("redis", plugins="no_such_plugin_module")
    out = cli("models", "list", env=env)
    assert out.returncode == 1
    assert "AGENT_WORKERS_PLUGINS names 'no_such_plugin_module'" in out.stderr and "Traceback" not in out.stderr


def test_models_history_all_is_every_record_and_limit_still_caps_it(redis_up: None) -> None:
    from agent_workers.config import Settings
    from agent_workers.store.params import RedisParamStore

    env = pool_env("redis", keep_versions=5)
    store = RedisParamStore.from_settings(Settings.from_env(env))
    model = unique("hist")
    try:
        store.create(model, make_spec("linear", in_features=1))
        head = store.head(model)
        tensors = store.read(model).parameters()
        for v in range(30):
            store.commit(model, expected=v, tensors=tensors, epoch=head.epoch)
        records = store.history(model, 0)
        out = cli("models", "history", model, "--all", env=env)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) == len(records) > 20  # was capped at --limit's 20
        kept = cli("models", "history", model, env=env).stdout.splitlines()
        assert len(kept) == 5  # the versions still kept (keep_versions)
        assert len(cli("models", "history", model, "--all", "--limit", "7", env=env).stdout.splitlines()) == 7
    finally:
        store.delete(model)
