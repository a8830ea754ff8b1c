"""The boundaries the layout promises, each a test that fails when someone crosses it.

* a producer (``agent_workers.client``) never imports the worker, the tools or torch;
* the runtime (everything but ``tools/`` and the CLI) never imports the tools;
* the library never imports its own Celery adapters (``tasks``);
* only ``worker/kombu_redis.py`` touches kombu's Redis internals;
* the store and training rooms never import the worker, the client or the tools, and the store never imports
  training (the worker's trainer calls training, training calls the store);
* no two modules import each other, directly or round a loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from agent_workers import lua

PACKAGE = Path(__file__).resolve().parents[2] / "agent_workers"
CLIENT_MAY_IMPORT = {
    "agent_workers.client",
    "agent_workers.config",
    "agent_workers.errors",
    "agent_workers.keys",
    "agent_workers.lua",  # server-side script text (the publisher's all-or-nothing push)
    "agent_workers.contract",
    "agent_workers.wire",
    "agent_workers.redis_clients",
    "agent_workers.tensors",  # the tensor codec (numpy only): the client sends arrays compactly
    "agent_workers.training.datasets",
    "agent_workers.store.artifacts",  # Client.put_artifacts: bytes into Redis (no torch), imported when called
}
KOMBU_INTERNALS = (
    "_q_for_pri",
    "_remove_from_indices",
    "unacked_index_key",
    "kombu.transport.redis",
    "kombu.transport import redis",
    "kombu.transport import virtual",
)


def modules(under: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in under.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name a file imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "tasks" or n.startswith(("agent_workers.", "tasks."))}


def test_importing_the_client_loads_no_worker_tool_or_torch_module() -> None:
    code = (
        "import sys, agent_workers.client, agent_workers.client.publisher, agent_workers.client.results; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'tasks', "
        "'agent_workers.worker', 'agent_workers.tools', 'agent_workers.store', 'agent_workers.training.steps', "
        "'agent_workers.training.groups', 'agent_workers.training.optim'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("path", modules(PACKAGE / "client"), ids=lambda p: p.name)
def test_client_imports_only_the_producer_side(path: Path) -> None:
    crossing = {
        n
        for n in ours(imported(path))
        if not any(n == allowed or n.startswith(allowed + ".") for allowed in CLIENT_MAY_IMPORT)
    }
    assert crossing == set(), f"{path.name} imports {sorted(crossing)}"
    assert not {n for n in imported(path) if n == "torch" or n.startswith("torch.")}


@pytest.mark.parametrize(
    "path",
    [p for p in modules() if not {"tools", "cli"} & set(p.relative_to(PACKAGE).parts) and p.name != "__main__.py"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_runtime_never_imports_the_tools_or_the_task_adapters(path: Path) -> None:
    crossing = {n for n in ours(imported(path)) if n.startswith("agent_workers.tools") or n.split(".")[0] == "tasks"}
    assert crossing == set(), f"{path.relative_to(PACKAGE)} imports {sorted(crossing)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_tools_never_import_the_task_adapters(path: Path) -> None:
    assert not {n for n in ours(imported(path)) if n.split(".")[0] == "tasks"}


def test_only_kombu_redis_knows_kombus_redis_internals() -> None:
    offenders = {
        str(p.relative_to(PACKAGE)): [w for w in KOMBU_INTERNALS if w in p.read_text()]
        for p in modules()
        if p.relative_to(PACKAGE) != Path("worker/kombu_redis.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("name", ["commit", "pop_and_record"])
def test_lua_scripts_ship_as_files(name: str) -> None:
    assert (PACKAGE / "lua" / f"{name}.lua").is_file()
    assert "redis.call" in lua.source(name)


ROOM_MAY_NOT_IMPORT = {
    "store": ("agent_workers.worker", "agent_workers.client", "agent_workers.tools", "agent_workers.training"),
    "training": ("agent_workers.worker", "agent_workers.client", "agent_workers.tools"),
}


@pytest.mark.parametrize(
    "path",
    [p for room in ROOM_MAY_NOT_IMPORT for p in modules(PACKAGE / room)],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_store_and_training_rooms_import_downwards_only(path: Path) -> None:
    forbidden = ROOM_MAY_NOT_IMPORT[path.relative_to(PACKAGE).parts[0]]
    crossing = {n for n in ours(imported(path)) if n.startswith(forbidden)}
    assert crossing == set(), f"{path.relative_to(PACKAGE)} imports {sorted(crossing)}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circles() -> None:
    names = {_module_name(p): p for p in modules()}
    graph = {name: {n for n in imported(path) if n in names and n != name} for name, path in names.items()}
    circles = []

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    for name, deps in graph.items():
        circles += [
            f"{name} <-> {dep}"
            for dep in deps
            if not dep.startswith(name + ".") and not name.startswith(dep + ".") and reaches(dep, name)
        ]
    assert circles == []
