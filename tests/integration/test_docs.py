"""README.md and docs/ are executable: README's ```python blocks and the shell lines of "Training from your app", and
every ```bash/```python block of every page under docs/, run as written against real workers on both brokers in a
namespaced deployment (queue names from AGENT_WORKERS_*_QUEUE): on Redis in `make test`, on RabbitMQ too in
`make test-all` (the slow marker; what the blocks do on RabbitMQ has tests of its own in the default run).

A docs block is run line by line unless the line before its fence says otherwise:

* ``<!-- docs-test: serve -->``: each line starts a worker that serves until stopped; the page's serve lines start
  first (each waits for its ready file) and stop (SIGTERM) after the page's other blocks ran;
* ``<!-- docs-test: not run: REASON -->``: a block that cannot run here (a Docker engine, a Sentinel group, minutes
  of load), with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.worker.launch import settings_env
from tests.conftest import REDIS_BY_DEFAULT, _cleanup, pool_env
from tests.integration.test_cli import stop_all, wait_for_files

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


DOCS = sorted((ROOT / "docs").glob("**/*.md"))
MARK = re.compile(r"<!-- docs-test: (serve|not run: (.*\S)) -->")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced shell or Python block of a docs page."""

    page: str
    line: int
    lang: str
    code: str
    mode: str  # run, serve or skip
    reason: str = ""

    def commands(self) -> list[str]:
        """Its shell commands: continuation lines joined, blank and comment-only lines left out."""
        joined = re.sub(r"\\\n\s*", " ", self.code)
        return [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def docs_blocks(path: Path) -> list[Block]:
    return text_blocks(path.read_text(), str(path.relative_to(ROOT)))


def text_blocks(text: str, page: str) -> list[Block]:
    """The fenced shell and Python blocks of ``text`` (a page, or a section of README.md), with their marks."""
    found = []
    for m in re.finditer(r"```(bash|sh|shell|python)\n(.*?)```", text, re.S):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.fullmatch(before.strip())
        mode = "run" if mark is None else ("serve" if mark.group(1) == "serve" else "skip")
        reason = mark.group(2) or "" if mark else ""
        line = text.count("\n", 0, m.start()) + 1
        found.append(Block(page, line, m.group(1), m.group(2), mode, reason))
    return found


def command(line: str) -> str:
    """A docs shell line with this checkout's interpreter for ``agent-workers``, ``celery`` and ``.venv/bin``."""
    # after leading VAR=value assignments too (AGENT_WORKERS_PLUGINS=... agent-workers ...)
    line = re.sub(
        r"^(\s*(?:\w+=\S+\s+)*)agent-workers\b", lambda m: f"{m.group(1)}{sys.executable} -m agent_workers", line
    )
    line = re.sub(r"^(\s*)celery\b", lambda m: f"{m.group(1)}{sys.executable} -m celery", line)
    return shell(line)


def exec_line(line: str) -> str:
    """``exec`` of a shell line, after its leading ``VAR=value`` assignments (which bash passes to the program)."""
    assignments, rest = re.fullmatch(r"(\s*(?:\w+=\S+\s+)*)(.*)", line, re.S).groups()  # type: ignore[union-attr]
    return f"{assignments}exec {rest}"


def test_hooks_page_shows_the_example_plugin_as_it_is() -> None:
    """docs/hooks.md prints examples/hooks_png.py, which its worker imports: the two must not drift apart."""
    plugin = (ROOT / "examples" / "hooks_png.py").read_text()
    assert plugin in [b.code for b in docs_blocks(ROOT / "docs" / "hooks.md")]


def test_every_docs_block_runs_or_says_why_not() -> None:
    blocks_ = [b for page in DOCS for b in docs_blocks(page)]
    assert any(b.mode == "run" for b in blocks_) and any(b.mode == "serve" for b in blocks_)
    for block in blocks_:
        assert block.mode != "skip" or len(block.reason) > 10, f"{block.page}:{block.line} not run without a reason"
        assert block.mode != "serve" or block.lang != "python", f"{block.page}:{block.line}: serve is for shell lines"


def write_inputs(where: Path) -> None:
    """The files the docs' blocks name: ``train.npz`` (x: 16 × 10, y) and ``rows.json`` (two 10-feature rows)."""
    rng = np.random.default_rng(0)
    np.savez(where / "train.npz", x=rng.standard_normal((16, 10)), y=rng.standard_normal((16, 1)))
    (where / "rows.json").write_text(json.dumps(rng.standard_normal((2, 10)).round(3).tolist()))


@REDIS_BY_DEFAULT  # RabbitMQ: the CLI, hooks, typed training and inspect tests of the default run, on both brokers
def test_docs_blocks_run_as_written(broker: str, redis_up: None, tmp_path: Path) -> None:
    env = pool_env(broker)
    write_inputs(tmp_path)
    try:
        for page in DOCS:
            blocks_ = docs_blocks(page)
            if any(b.mode in ("run", "serve") for b in blocks_):
                run_page(blocks_, env, tmp_path)
    finally:
        _cleanup(Settings.from_env(env))


def run_page(blocks_: list[Block], env: dict[str, str], where: Path) -> None:
    servers: list[subprocess.Popen[bytes]] = []
    try:
        serve = [c for b in blocks_ if b.mode == "serve" for c in b.commands()]
        ready = [where / f"ready-{i}" for i in range(len(serve))]
        for i, line in enumerate(serve):
            log = (where / f"server-{i}.log").open("ab")
            server_env = settings_env({**env, "AGENT_WORKERS_READY_FILE": str(ready[i])})
            servers.append(
                subprocess.Popen(
                    ["bash", "-c", exec_line(command(line))], env=server_env, cwd=where, stdout=log, stderr=log
                )
            )
        for i, server in enumerate(servers):
            wait_for_files([ready[i]], server, where / f"server-{i}.log")
        for block in (b for b in blocks_ if b.mode == "run"):
            steps = [[sys.executable, "-c", block.code]] if block.lang == "python" else None
            for cmd in steps or [["bash", "-c", command(c)] for c in block.commands()]:
                out = subprocess.run(cmd, env=settings_env(env), cwd=where, capture_output=True, text=True, timeout=300)
                assert out.returncode == 0, f"{block.page}:{block.line}: {cmd[-1]}\n{out.stdout}\n{out.stderr}"
    finally:
        stop_all(servers)


def test_readme_has_a_tested_training_example() -> None:
    training = section("Training from your app")
    assert any("on_progress" in b and "upload_dataset" in b for b in blocks(training, "python"))
    assert any("datasets upload" in b and "agent-workers fit" in b for b in blocks(training, "bash"))


@REDIS_BY_DEFAULT  # RabbitMQ: test_cli's datasets/fit and the Client tests of the default run, on both brokers
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
    # "Your own model" needs a worker with its plugin: tests/integration/test_own_model.py runs it.
    for block in blocks(README.read_text().replace(section("Your own model"), ""), "python"):
        out = subprocess.run(
            [sys.executable, "-c", block], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, f"{block}\n{out.stdout}\n{out.stderr}"


# -- figures and examples the pages state, against the code -------------------------------------------------------


def page(name: str) -> str:
    return (ROOT / name).read_text()


def test_documented_defaults_are_the_code_defaults() -> None:
    from agent_workers.config import DEFAULT_DEDUP_WINDOW

    (applied,) = [line for line in page("docs/training.md").splitlines() if "`…:applied`" in line]
    assert f"{DEFAULT_DEDUP_WINDOW:,}" in applied and "DEDUP_WINDOW" in applied
    # The trainer's prefetch is AGENT_WORKERS_TRAIN_GROUP (8 by default), 1 only with TRAIN_GROUP=1.
    train_group = Settings().train_group
    for name in ("docs/operations.md", "docs/scaling.md", "README.md"):
        for para in page(name).split("\n\n"):
            if "prefetch 1" in para and "rainer" in para:
                assert "TRAIN_GROUP=1" in para, f"{name}: {para}"
            assert "inference queue, 1 otherwise" not in para, f"{name}: {para}"  # a trainer's is TRAIN_GROUP
    assert f"`AGENT_WORKERS_TRAIN_GROUP`, {train_group} by default" in page("docs/operations.md")


def test_tasks_page_never_contradicts_itself_on_priorities_or_queue_names() -> None:
    text = page("docs/tasks.md")
    assert "Priorities are not used" not in text
    assert "priority" in text and "orders the requests of one batch" in text
    # An example sent to the default queue name waits PENDING for ever in a namespaced deployment: the example
    # uses a namespaced name, and the page says where the name comes from.
    assert '"queue": "inference"' not in text
    assert '`"queue"` is the deployment\'s `AGENT_WORKERS_INFERENCE_QUEUE`' in text


def test_readme_inspect_models_output_has_the_replys_shape(pool) -> None:
    from agent_workers.worker.control import inspect_models

    shown = page("README.md").split("inspect models -d readme@vm\n", 1)[1]
    shown_reply = json.loads(shown.split("readme@vm: OK\n", 1)[1].split("```", 1)[0])
    model = f"readme-shape-{pool.settings.namespace}"
    pool.store.create(model, make_spec("linear", in_features=3))
    pool.client.app.send_task(
        "agent_workers.predict", args=[model, [1.0, 2.0, 3.0]], queue=pool.settings.inference_queue
    ).get(timeout=60)
    node = pool.worker.ready_path.read_text()
    reply = inspect_models(pool.client.app, timeout=5, destination=[node])[node]
    assert set(shown_reply) == set(reply)
    assert set(shown_reply["memory"]) == set(reply["memory"])
    assert set(shown_reply["models"][0]) == set(reply["models"][0])
