"""README's "Your own model", as a new user follows it (on Redis; on RabbitMQ too in `make test-all`): a worker
started with the zoo plugin, the data and artifacts written, both models created from the CLI, trained through the
queue (``fit``), and top-k labels of held-out PNGs and sentences from a bare Celery producer and from Node.js. Beside
it, the zoo's raw inputs against a real worker, on both brokers: a bad PNG and a sentence with an unknown word fail
alone in their batch, tensors still work."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import examples.models.zoo as zoo
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.worker.launch import settings_env
from tests.conftest import IN_CI, REDIS_BY_DEFAULT, Pool, _cleanup, pool_env, serving_pool, unique
from tests.integration.test_cli import stop_all, wait_for_files
from tests.integration.test_docs import ROOT, Block, command, exec_line, section, text_blocks

pytestmark = pytest.mark.integration

SECTION = "Your own model"
NODE_MODULES = ROOT / "examples" / "node" / "node_modules" / "celery-ts"


def runnable(block: Block) -> Block:
    """``block`` as this machine can run it. ``npm ci`` is what `make test` and .ci/run already did for the e2e
    tests (running it again would reinstall the packages under them), so it is left out; Node's lines run where
    Node and examples/node's packages are (the e2e suite's requirement: a failure under CI, a skip elsewhere)."""
    if block.lang != "bash":
        return block
    node = shutil.which("node") is not None and NODE_MODULES.is_dir()
    if not node and IN_CI:
        pytest.fail("README's Node lines need node and examples/node/node_modules (.ci/run installs them)")
    keep = []
    for line in block.code.splitlines():
        if "npm ci" in line or (line.startswith("node ") and not node):
            print(f"(not run here: {line})")
            continue
        keep.append(line)
    return dataclasses.replace(block, code="\n".join(keep) + "\n")


def test_readme_registration_excerpt_is_the_plugins_code() -> None:
    """The registrations README shows, shortened, are lines of examples/models/zoo.py as they are (no drift)."""
    plugin = (ROOT / "examples" / "models" / "zoo.py").read_text().splitlines()
    text = section(SECTION)
    excerpt = text.split("```text\n", 1)[1].split("```", 1)[0]
    assert "@register_architecture" in excerpt
    for line in excerpt.splitlines():
        assert line in plugin or line in ("", "    ..."), line  # "..." stands for a body left out


@REDIS_BY_DEFAULT  # RabbitMQ: the zoo's hooks below, test_cli's fit and the Node producer tests, on both brokers
def test_readme_own_model_runs_as_written(broker: str, redis_up: None, tmp_path: Path) -> None:
    env = pool_env(broker)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the repository's root, as README's lines expect
    blocks_ = [runnable(b) for b in text_blocks(section(SECTION), "README.md")]
    serve = [c for b in blocks_ if b.mode == "serve" for c in b.commands()]
    assert serve and all("AGENT_WORKERS_PLUGINS=examples.models.zoo" in c for c in serve)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for i, line in enumerate(serve):
            log = (tmp_path / f"server-{i}.log").open("ab")
            server_env = settings_env({**env, "AGENT_WORKERS_READY_FILE": str(tmp_path / f"ready-{i}")})
            servers.append(
                subprocess.Popen(["bash", "-c", exec_line(command(line))], env=server_env, cwd=tmp_path, stdout=log,
                                 stderr=log)
            )  # fmt: skip
        for i, server in enumerate(servers):
            wait_for_files([tmp_path / f"ready-{i}"], server, tmp_path / f"server-{i}.log")
        outputs = []
        for block in (b for b in blocks_ if b.mode == "run"):
            steps = [[sys.executable, "-c", block.code]] if block.lang == "python" else None
            for cmd in steps or [["bash", "-c", command(c)] for c in block.commands()]:
                started = time.perf_counter()
                out = subprocess.run(cmd, env=settings_env(env), cwd=tmp_path, capture_output=True, text=True,
                                     timeout=300)  # fmt: skip
                assert out.returncode == 0, f"README.md:{block.line}: {cmd[-1]}\n{out.stdout}\n{out.stderr}"
                print(f"[{time.perf_counter() - started:.1f}s] {cmd[-1][:100]!r}\n{out.stdout.strip()[-600:]}")
                outputs.append((cmd[-1], out.stdout))
    finally:
        stop_all(servers)
        _cleanup(Settings.from_env(env))
    said = "\n".join(o for _, o in outputs)
    assert "digits: " in said and "order: " in said  # the producer's accuracy lines (it asserts the goals itself)
    from_node = {("--png" in cmd): json.loads(out) for cmd, out in outputs if cmd.startswith("node ")}
    if shutil.which("node") is not None and NODE_MODULES.is_dir():
        (png,), (text,) = from_node[True], from_node[False]
        assert png["status"] == "SUCCESS" and png["result"]["top_k"][0]["label"] == "seven"  # 000-7.png
        assert text["status"] == "SUCCESS" and text["result"]["top_k"][0]["label"] == "b-first"


@pytest.fixture(scope="module")
def zoo_pool(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One worker per broker that knows the zoo (examples/models/zoo.py), its requests batched together."""
    yield from serving_pool(broker, tmp_path_factory, max_wait_ms=100, plugins="examples.models.zoo")


def test_a_bad_png_and_an_unknown_word_fail_alone_and_tensors_still_work(zoo_pool: Pool) -> None:
    digits, order = unique("digits"), unique("order")
    zoo_pool.store.create(digits, make_spec("digits_cnn"), artifacts={"labels": json.dumps(list(zoo.DIGIT_LABELS))})
    zoo_pool.store.create(
        order,
        make_spec("order_transformer"),
        artifacts={"labels": json.dumps(list(zoo.ORDER_LABELS)), "tokenizer": zoo.order_tokenizer().to_str()},
    )
    _, x_test, _, _ = zoo.digits_data()
    png = {"image": {"b64": base64.b64encode(zoo.digits_png(x_test[0])).decode()}}
    bad_png = {"image": {"b64": base64.b64encode(b"\x89PNG\r\n\x1a\n but not a picture").decode()}}
    requests = [
        (digits, png),
        (digits, bad_png),
        (digits, x_test[0].tolist()),  # plain uint8 tensor, as before the hook
        (order, {"text": "the a cat sat on b"}),
        (order, {"text": "the a zebra sat on b"}),
        (order, [3, 1, 4, 5, 6, 2]),  # plain token ids: the same sentence
    ]
    sent = [
        zoo_pool.client.app.send_task(
            "agent_workers.predict",
            kwargs={"model": m, "inputs": x, "options": {"top_k": 2, "softmax": True}},
            queue=zoo_pool.settings.inference_queue,
        )
        for m, x in requests
    ]
    for s in sent:
        s.get(timeout=60, propagate=False)
    states = [s.state for s in sent]
    assert states == ["SUCCESS", "FAILURE", "SUCCESS", "SUCCESS", "FAILURE", "SUCCESS"]
    assert "UnidentifiedImageError" in str(sent[1].result) and type(sent[1].result).__name__ == "InputError"
    assert "unknown words ['zebra']" in str(sent[4].result) and type(sent[4].result).__name__ == "InputError"
    png_answer, tensor_answer = sent[0].result, sent[2].result
    assert png_answer["top_k"] == tensor_answer["top_k"]  # the PNG decodes to exactly the tensor's pixels
    assert {t["label"] for t in png_answer["top_k"]} <= set(zoo.DIGIT_LABELS)
    text_answer, ids_answer = sent[3].result, sent[5].result
    assert sorted(t["label"] for t in text_answer["top_k"]) == ["a-first", "b-first"]
    assert text_answer["top_k"] == ids_answer["top_k"]  # the tokenizer made exactly these ids
