"""docker-compose.yml and the Dockerfile: valid for docker-compose, and holding the promises of docs/operations.md.

There is no Docker engine here, so nothing is started: ``docker-compose config`` validates and interpolates the
file, and the tests read what it resolved (GPU reservations, Flower's credentials, the cpu profile, health-gated
start-up, settings every worker accepts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from agent_workers.config import Settings
from tests.conftest import need

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SECRETS = {"RABBITMQ_PASSWORD": "rabbit-pw-123", "FLOWER_BASIC_AUTH": "admin:flower-pw-456"}
APP_SERVICES = ("worker", "trainer", "worker-cpu", "flower")
WORKERS = ("worker", "trainer", "worker-cpu")
# Variables the file interpolates, or that steer docker-compose itself (COMPOSE_PROFILES would switch the cpu
# profile on): the tests must not inherit a developer's values.
_OURS = ("AGENT_WORKERS_", "FLOWER_", "RABBITMQ_", "REDIS_", "TORCH_", "WORKER_IMAGE", "COMPOSE_")


def docker_compose(
    tmp_path: Path, *args: str, drop: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose -f docker-compose.yml ARGS`` with our secrets set (less ``drop``) and no .env file."""
    exe = shutil.which("docker-compose")
    need(exe is not None, "docker-compose (apt-get install docker-compose)")
    assert exe is not None
    environ = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    environ.update({k: v for k, v in SECRETS.items() if k not in drop}, **env)
    env_file = tmp_path / "empty.env"  # docker-compose v1 refuses /dev/null ("is not a file")
    env_file.touch()
    return subprocess.run(
        [exe, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def load_yaml(text: str) -> Any:
    """Parse YAML with PyYAML: ours when installed, else the interpreter docker-compose v1 runs on (it needs it)."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)
    exe = shutil.which("docker-compose")
    assert exe is not None
    shebang = Path(exe).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
    interpreter = shebang[2:].strip().split()
    if not shebang.startswith("#!") or "python" not in " ".join(interpreter):
        need(False, "PyYAML (docker-compose is not a Python program here to borrow it from)")
    out = subprocess.run(
        [*interpreter, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The file as docker-compose resolves it, with the cpu profile on."""
    out = docker_compose(tmp_path_factory.mktemp("compose"), "--profile", "cpu", "config")
    assert out.returncode == 0, out.stderr
    return dict(load_yaml(out.stdout))


def service(resolved: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(resolved["services"][name])


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@pytest.mark.parametrize("profile", [(), ("--profile", "cpu")], ids=["default", "cpu-profile"])
def test_compose_file_is_valid(tmp_path: Path, profile: tuple[str, ...]) -> None:
    out = docker_compose(tmp_path, *profile, "config", "-q")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_run_without_each_secret(tmp_path: Path, secret: str) -> None:
    out = docker_compose(tmp_path, "config", "-q", drop=(secret,))
    assert out.returncode != 0
    assert secret in out.stderr


def test_gpu_services_reserve_one_nvidia_gpu_and_the_cpu_worker_none(resolved: dict[str, Any]) -> None:
    for name in ("worker", "trainer"):
        devices = service(resolved, name)["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1
        assert devices[0]["driver"] == "nvidia"
        assert int(devices[0]["count"]) == 1
        assert devices[0]["capabilities"] == ["gpu"]
        assert environment(service(resolved, name))["AGENT_WORKERS_DEVICE"].startswith("cuda")
    for name in ("worker-cpu", "flower", "redis", "rabbitmq"):
        assert "deploy" not in service(resolved, name), name
    assert environment(service(resolved, "worker-cpu"))["AGENT_WORKERS_DEVICE"] == "cpu"


def test_cpu_worker_runs_only_under_the_cpu_profile(tmp_path: Path, resolved: dict[str, Any]) -> None:
    assert service(resolved, "worker-cpu")["profiles"] == ["cpu"]
    others = [name for name in resolved["services"] if name != "worker-cpu"]
    assert all("profiles" not in service(resolved, name) for name in others), others
    out = docker_compose(tmp_path, "config", "--profiles")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu"]


def test_flower_takes_basic_auth_from_the_environment_and_listens_on_loopback(resolved: dict[str, Any]) -> None:
    flower = service(resolved, "flower")
    assert environment(flower)["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    command = " ".join(flower["command"])
    assert "flower" in command
    assert "flower-pw" not in command  # a password on the command line shows in `ps`
    published = [
        str(p.get("host_ip", "")) if isinstance(p, dict) else str(p).split(":")[0] for p in flower.get("ports", [])
    ]
    assert published == ["127.0.0.1"]


def test_rabbitmq_has_a_dedicated_user_and_vhost_that_every_service_uses(resolved: dict[str, Any]) -> None:
    rabbit = environment(service(resolved, "rabbitmq"))
    user, vhost = rabbit["RABBITMQ_DEFAULT_USER"], rabbit["RABBITMQ_DEFAULT_VHOST"]
    assert user and user != "guest"
    assert vhost and vhost != "/"
    assert rabbit["RABBITMQ_DEFAULT_PASS"] == SECRETS["RABBITMQ_PASSWORD"]
    for name in APP_SERVICES:
        url = urlparse(environment(service(resolved, name))["AGENT_WORKERS_BROKER_URL"])
        assert (url.scheme, url.username, url.password, url.hostname, url.path) == (
            "amqp",
            user,
            SECRETS["RABBITMQ_PASSWORD"],
            "rabbitmq",
            f"/{vhost}",
        ), name
    assert "guest" not in json.dumps(resolved)


def test_app_services_start_only_after_healthy_redis_and_rabbitmq(resolved: dict[str, Any]) -> None:
    for name in ("redis", "rabbitmq"):
        assert service(resolved, name)["healthcheck"]["test"], name
    for name in APP_SERVICES:
        depends = service(resolved, name)["depends_on"]
        assert {dep: depends[dep]["condition"] for dep in ("redis", "rabbitmq")} == {
            "redis": "service_healthy",
            "rabbitmq": "service_healthy",
        }, name


def test_worker_health_is_the_readiness_file_on_a_tmpfs(resolved: dict[str, Any]) -> None:
    for name in WORKERS:
        svc = service(resolved, name)
        ready = environment(svc)["AGENT_WORKERS_READY_FILE"]
        assert ready in svc["healthcheck"]["test"], name
        assert str(Path(ready).parent) in svc["tmpfs"], name


def test_every_service_passes_the_settings_check(resolved: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        env = environment(service(resolved, name))
        Settings.from_env({k: v for k, v in env.items() if k.startswith("AGENT_WORKERS_")})


def test_workers_consume_the_queues_the_settings_name(tmp_path: Path) -> None:
    out = docker_compose(
        tmp_path,
        "--profile",
        "cpu",
        "config",
        AGENT_WORKERS_INFERENCE_QUEUE="inf-x",
        AGENT_WORKERS_TRAINING_QUEUE="train-y",
    )
    assert out.returncode == 0, out.stderr
    resolved = load_yaml(out.stdout)
    for name, queue in (("worker", "inf-x"), ("trainer", "train-y")):
        svc = service(resolved, name)
        command = svc["command"]
        assert command[command.index("--queues") + 1] == queue, name
    for name in APP_SERVICES:
        env = environment(service(resolved, name))
        assert (env["AGENT_WORKERS_INFERENCE_QUEUE"], env["AGENT_WORKERS_TRAINING_QUEUE"]) == ("inf-x", "train-y")


def test_dockerfile_installs_pinned_torch_before_the_package() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    assert pinned, "the Dockerfile must pin torch (ARG TORCH_VERSION=...)"
    torch_install = text.find('"torch==${TORCH_VERSION}"')
    package_install = text.find("pip install .")
    assert 0 <= torch_install < package_install
    compose_default = re.search(r"TORCH_VERSION: \$\{TORCH_VERSION:-([^}]+)\}", COMPOSE_FILE.read_text())
    assert compose_default and compose_default.group(1) == pinned.group(1)


def test_flower_environment_names_only_options_flower_knows(resolved: dict[str, Any]) -> None:
    # Flower turns every FLOWER_* variable into an option at start-up and dies on a name it does not know.
    import flower.options  # noqa: F401 - registers Flower's options
    from tornado.options import options

    names = [k[len("FLOWER_") :].lower() for k in environment(service(resolved, "flower")) if k.startswith("FLOWER_")]
    assert "basic_auth" in names
    assert [name for name in names if name not in options] == []


def settings_names() -> set[str]:
    """Every AGENT_WORKERS_* variable config.py reads (``r.int("MAX_BATCH_SIZE", ...)`` and the like)."""
    source = (ROOT / "agent_workers" / "config.py").read_text()
    return {"AGENT_WORKERS_" + name for name in re.findall(r"\br\.\w+\(\s*\"([A-Z0-9_]+)\"", source)}


def test_compose_sets_only_real_settings(resolved: dict[str, Any]) -> None:
    known = settings_names()
    assert "AGENT_WORKERS_MAX_BATCH_SIZE" in known
    for name in APP_SERVICES:
        unknown = {k for k in environment(service(resolved, name)) if k.startswith("AGENT_WORKERS_")} - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which config.py never reads"


def test_every_setting_is_documented_in_operations_md() -> None:
    docs = (ROOT / "docs" / "operations.md").read_text()
    missing = sorted(name for name in settings_names() if f"`{name}`" not in docs)
    assert not missing, f"docs/operations.md does not describe {missing}"
