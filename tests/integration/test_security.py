"""No one let in: password- and TLS-protected Redis for broker, backend and parameter store; pickle weights refused."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from agent_workers.cli import main as cli
from agent_workers.errors import ModelError
from agent_workers.models import load_weights, make_spec
from agent_workers.tools.supervisor import LocalRedis, free_port
from tests.conftest import IN_CI, Pool, need, pool_env, unique

pytestmark = pytest.mark.integration


class _Pwn:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.target, "pwned"))


def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"weight": _Pwn(marker)}))
    torch_ckpt = tmp_path / "real.pt"
    torch.save(torch.nn.Linear(3, 1).state_dict(), torch_ckpt)
    spec = make_spec("linear", in_features=3)
    for path in (evil, torch_ckpt):
        with pytest.raises(ModelError, match="pickle checkpoints .* are never loaded"):
            load_weights(spec, path)
    assert not marker.exists()


def test_cli_creates_a_model_from_safetensors_and_refuses_a_pickle(
    redis_up: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = pool_env("redis")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    weights = {"weight": torch.tensor([[1.0, 2.0, 3.0]]), "bias": torch.tensor([0.5])}
    save_file(weights, tmp_path / "w.safetensors")
    torch.save(weights, tmp_path / "w.pt")
    runner = CliRunner()
    config = '{"in_features": 3}'
    ok = runner.invoke(
        cli, ["models", "create", "good", "--config", config, "--weights", str(tmp_path / "w.safetensors")]
    )
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["models", "create", "bad", "--config", config, "--weights", str(tmp_path / "w.pt")])
    assert bad.exit_code != 0 and "never loaded" in bad.output
    from agent_workers.config import Settings
    from agent_workers.store.params import RedisParamStore

    store = RedisParamStore.from_settings(Settings.from_env(env))
    try:
        assert store.read("good").parameters()["weight"].tolist() == [[1.0, 2.0, 3.0]]
        assert store.list() == ["good"]
    finally:
        store.delete("good")


def _pool_on(start_pool, url_for: callable, broker: str = "redis", **extra: object) -> Pool:
    env_over = {"broker_url": url_for(0), "result_backend": url_for(1), "params_url": url_for(2), **extra}
    return start_pool(broker, queues="both", **env_over)


def test_password_protected_redis_serves_broker_backend_and_params(redis_up: None, start_pool) -> None:
    need(shutil.which("redis-server") is not None, "redis-server binary")
    server = LocalRedis(args=["--requirepass", "s3cret", "--save", "", "--appendonly", "no"])
    server.args = ["--requirepass", "s3cret", "--save", "", "--appendonly", "no"]
    port = server.port
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", server.dir, *server.args],
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: redis.Redis(port=port, password="s3cret").ping())
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping() and redis.Redis(port=port).set("x", 1)
        pool = _pool_on(start_pool, lambda db: f"redis://:s3cret@127.0.0.1:{port}/{db}")
        model = unique("lin")
        pool.store.create(model, make_spec("linear", in_features=2))
        assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0
        step = pool.client.wait(pool.client.send_train_step(model, x=[[1.0, 2.0]], y=[[1.0]]), 30)
        assert step["version"] == 1
    finally:
        proc.terminate()
        proc.wait(10)


def _make_cert(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "redis.key", tmp / "redis.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def _wait_for(check: callable, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server did not come up")
        time.sleep(0.05)  # noqa: sleep-ok - poll interval of a deadline-bounded wait


def test_tls_redis_serves_broker_backend_and_params(redis_up: None, start_pool, tmp_path: Path) -> None:
    need(shutil.which("openssl") is not None, "openssl binary")
    key, cert = _make_cert(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        url = lambda db: f"rediss://:s3cret@127.0.0.1:{port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={cert}"  # noqa: E731
        _wait_for(lambda: redis.Redis.from_url(url(0)).ping())
        if proc.poll() is not None:
            pytest.fail("redis-server refused the TLS options") if IN_CI else pytest.skip("no TLS in redis-server")
        with pytest.raises(redis.ConnectionError):  # plain TCP to the TLS port is refused
            redis.Redis(port=port, password="s3cret", socket_timeout=2).ping()
        pool = _pool_on(start_pool, url)
        model = unique("lin")
        pool.store.create(model, make_spec("linear", in_features=2))
        assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0
        assert pool.client.wait(pool.client.send_train_step(model, x=[[1.0, 2.0]], y=[[1.0]]), 30)["version"] == 1
    finally:
        proc.terminate()
        proc.wait(10)
