"""Training maths against torch.optim on tiny models, and the train step's conflict rules on an in-memory store."""

from __future__ import annotations

import contextlib
import json
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from agent_workers.errors import InputError, ModelError, StoreError
from agent_workers.models import ModelSpec, make_spec
from agent_workers.store.blobs import PARAM_PREFIX, Snapshot
from agent_workers.store.params import CommitOutcome, CommitResult
from agent_workers.training import optim
from agent_workers.training import steps as training
from agent_workers.training.steps import HyperParams, apply_update, compute_gradient, train_step

STEPS = 6


def batches(rng: np.random.Generator, classes: int | None, out: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    result = []
    for _ in range(STEPS):
        x = rng.standard_normal((8, 4)).astype(np.float32)
        y = rng.integers(0, classes, 8) if classes else rng.standard_normal((8, out)).astype(np.float32)
        result.append((x, y))
    return result


def run_ours(
    spec: ModelSpec, module: torch.nn.Module, hp: HyperParams, data: list[tuple[np.ndarray, np.ndarray]]
) -> Snapshot:
    snap = Snapshot("m", 0, "e", {PARAM_PREFIX + k: v.detach().clone() for k, v in module.state_dict().items()})
    for x, y in data:
        grads, _ = compute_gradient(spec, snap, x, y, hp)
        snap = Snapshot("m", snap.version + 1, "e", apply_update(snap, grads, hp))
    return snap


def run_torch(
    module: torch.nn.Module,
    hp: HyperParams,
    data: list[tuple[np.ndarray, np.ndarray]],
) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            module.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.l2
        )
    else:
        opt = torch.optim.Adam(module.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.l2)
    for x, y in data:
        opt.zero_grad()
        out = module(torch.from_numpy(x))
        if hp.loss == "mse":
            loss = torch.nn.functional.mse_loss(out, torch.from_numpy(y))
        else:
            loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y).long())
        # torch.optim has no L1 term: put it in the loss, whose gradient l1·sign(p) is what we apply.
        loss = loss + hp.l1 * sum(p.abs().sum() for p in module.parameters())
        loss.backward()
        opt.step()
    return opt


CASES = {
    "sgd": dict(optimizer="sgd", lr=0.1),
    "sgd-momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9),
    "sgd-momentum-l2": dict(optimizer="sgd", lr=0.05, momentum=0.5, l2=0.01),
    "sgd-l1": dict(optimizer="sgd", lr=0.05, l1=0.01),
    "adam": dict(optimizer="adam", lr=0.01),
    "adam-betas-l2-l1": dict(optimizer="adam", lr=0.02, betas=(0.8, 0.99), eps=1e-6, l2=0.05, l1=0.001),
}


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_matches_torch_optim_exactly(case: str, loss: str) -> None:
    hp = HyperParams.from_json({**CASES[case], "loss": loss})
    if loss == "mse":
        spec = make_spec("linear", in_features=4, out_features=2)
        data = batches(np.random.default_rng(1), None)
    else:
        spec = make_spec("mlp", in_features=4, hidden=[5], out_features=3)
        data = batches(np.random.default_rng(1), 3)
    torch.manual_seed(0)
    module = spec.build()
    ours = run_ours(spec, module, hp, data)
    opt = run_torch(module, hp, data)
    for name, p in module.named_parameters():
        torch.testing.assert_close(ours.parameters()[name], p.detach(), rtol=1e-5, atol=1e-6)
        state = opt.state[p]
        prefix = f"o.{hp.optimizer}."
        if hp.optimizer == "adam":
            # The optimizer state is versioned with the parameters, so it must be torch's state too.
            torch.testing.assert_close(ours.tensors[f"{prefix}m.{name}"], state["exp_avg"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ours.tensors[f"{prefix}v.{name}"], state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        elif hp.momentum:
            torch.testing.assert_close(
                ours.tensors[f"{prefix}buf.{name}"], state["momentum_buffer"], rtol=1e-5, atol=1e-7
            )
    assert int(ours.tensors[f"o.{hp.optimizer}.step"][0]) == STEPS


def test_apply_update_leaves_the_snapshot_untouched() -> None:
    spec = make_spec("linear", in_features=2)
    snap = Snapshot("m", 0, "e", {PARAM_PREFIX + k: v.clone() for k, v in spec.build().state_dict().items()})
    before = {k: v.clone() for k, v in snap.tensors.items()}
    grads, _ = compute_gradient(spec, snap, np.ones((3, 2), np.float32), np.ones(3, np.float32), HyperParams())
    apply_update(snap, grads, HyperParams(optimizer="adam", l2=0.1))
    assert snap.tensors.keys() == before.keys()
    assert all(torch.equal(snap.tensors[k], before[k]) for k in before)


def test_losses_are_torch_losses() -> None:
    out = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    assert optim._LOSSES["mse"](out, torch.tensor([[1.0, 1.0], [1.0, 1.0]])).item() == pytest.approx(
        torch.nn.functional.mse_loss(out, torch.ones(2, 2)).item()
    )
    assert optim._LOSSES["cross_entropy"](out, torch.tensor([1.0, 0.0])).item() == pytest.approx(
        torch.nn.functional.cross_entropy(out, torch.tensor([1, 0])).item()
    )


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"loss": "hinge"}, "unknown loss"),
        ({"lr": 0}, "lr must be > 0"),
        ({"momentum": 1.5}, "momentum"),
        ({"betas": [0.9, 1.0]}, "betas"),
        ({"l2": -1}, "l1, l2 >= 0"),
        ({"learning_rate": 0.1}, "unknown hyperparameters"),
        ({"lr": "fast"}, "lr must be a finite number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"betas": ["a", 0.9]}, "betas must be a finite number"),
        ({"betas": 0.9}, "bad hyperparameters"),
    ],
)
def test_bad_hyperparameters_are_refused_with_the_name(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InputError) as info:
        HyperParams.from_json(data)
    assert fragment in str(info.value)


# -- the step's conflict rules, on an in-memory store ------------------------------------------------------------


class MemoryStore:
    """Enough of RedisParamStore for train_step; ``rivals`` run before each commit to simulate other trainers."""

    def __init__(self, spec: ModelSpec) -> None:
        torch.manual_seed(0)
        self._spec = spec
        self.version = 0
        self.barrier = 0
        self.tensors = {PARAM_PREFIX + k: v.clone() for k, v in spec.build().state_dict().items()}
        self.applied_ids: dict[str, int] = {}
        self.rivals: list[Callable[[MemoryStore], None]] = []
        self.commits = 0
        self.locks = 0
        self.epoch = "e"
        self.epochs_committed: list[str] = []
        self.infos: list[dict[str, Any]] = []

    def read(self, name: str, version: int | None = None) -> Snapshot:
        return Snapshot(name, self.version, self.epoch, dict(self.tensors), self.barrier)

    def spec(self, name: str, epoch: str | None = None) -> ModelSpec:
        return self._spec

    def applied(self, name: str, update_id: str) -> int | None:
        return self.applied_ids.get(update_id)

    def applied_many(self, name: str, update_ids: list[str]) -> list[int | None]:
        return [self.applied_ids.get(u) for u in update_ids]

    @contextlib.contextmanager
    def exclusive(self, name: str, *, turn: bool = False, turn_wait: float | None = None) -> Iterator[None]:
        self.locks += 1
        yield

    def rival_commits(
        self, n: int, *, rollback: bool = False, steps: int = 0, optimizer: str = "sgd"
    ) -> Callable[[MemoryStore], None]:
        """Another trainer's ``n`` commits of ``steps`` optimizer steps in all (its parameters left as they were)."""

        def rival(store: MemoryStore) -> None:
            store.version += n
            if steps:
                key = f"o.{optimizer}.step"
                taken = int(store.tensors.get(key, torch.zeros(1))[0])
                store.tensors = {**store.tensors, key: torch.tensor([taken + steps], dtype=torch.float64)}
            if rollback:
                store.barrier = store.version

        return rival

    def commit(
        self,
        name: str,
        *,
        expected: int,
        tensors: dict[str, torch.Tensor],
        update_id: str = "",
        info: dict[str, Any] | None = None,
        epoch: str = "",
        more_ids: tuple[str, ...] | list[str] = (),
    ) -> CommitResult:
        self.commits += 1
        if self.rivals:
            self.rivals.pop(0)(self)
        ids = [update_id, *more_ids]
        done = {u: self.applied_ids[u] for u in ids if u in self.applied_ids}
        if done:  # as commit.lua: the whole group refused, naming every id applied before
            return CommitResult(CommitOutcome.DUPLICATE, done[next(iter(done))], done)
        if expected != self.version:
            return CommitResult(CommitOutcome.CONFLICT, self.version)
        if epoch and epoch != self.epoch:
            raise ModelError(f"model {name!r} was recreated while this update was computed; it no longer applies")
        self.epochs_committed.append(epoch)
        self.version += 1
        self.tensors = tensors
        self.applied_ids.update(dict.fromkeys(ids, self.version))
        self.infos.append(info or {})
        return CommitResult(CommitOutcome.COMMITTED, self.version)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts gradient computations and records backoff sleeps (no real sleeping)."""
    seen: dict[str, Any] = {"gradients": 0, "sleeps": []}
    original = training.compute_gradient

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen["gradients"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "compute_gradient", counting)
    monkeypatch.setattr(
        training,
        "time",
        types.SimpleNamespace(sleep=seen["sleeps"].append, perf_counter=__import__("time").perf_counter),
    )
    return seen


X, Y = [[1.0, 2.0]], [[3.0]]
SPEC = make_spec("linear", in_features=2)
HP = HyperParams(lr=0.1)


def test_a_gradient_within_the_staleness_bound_is_reused(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    store.rivals = [store.rival_commits(3)]
    result = train_step(store, "m", X, Y, HP, update_id="u", max_staleness=4)  # type: ignore[arg-type]
    assert (result.version, result.attempts, result.conflicts, result.staleness, result.recomputed) == (4, 2, 1, 3, 0)
    assert counted["gradients"] == 1


def test_a_gradient_beyond_the_staleness_bound_is_recomputed(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    store.rivals = [store.rival_commits(3)]
    result = train_step(store, "m", X, Y, HP, update_id="u", max_staleness=2)  # type: ignore[arg-type]
    assert (result.version, result.staleness, result.recomputed) == (4, 0, 1)
    assert counted["gradients"] == 2


def test_a_rollback_since_the_gradient_forces_a_recompute(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    store.rivals = [store.rival_commits(1, rollback=True)]
    result = train_step(store, "m", X, Y, HP, update_id="u", max_staleness=4)  # type: ignore[arg-type]
    assert (result.version, result.staleness, result.recomputed) == (2, 0, 1)


def test_retries_are_bounded_and_backoff_is_jittered_and_capped(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    store.rivals = [store.rival_commits(1) for _ in range(10)]
    with pytest.raises(StoreError, match="still conflicted after 8 attempts"):
        train_step(store, "m", X, Y, HP, update_id="u", max_attempts=8)  # type: ignore[arg-type]
    assert store.commits == 8
    sleeps = counted["sleeps"]
    assert len(sleeps) == 7
    for attempt, delay in enumerate(sleeps, start=1):
        assert 0 <= delay <= min(training.BACKOFF_CAP, training.BACKOFF_BASE * 2**attempt)


def test_an_applied_update_id_returns_a_duplicate_without_computing_or_locking(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    store.applied_ids["u"] = 7
    result = train_step(store, "m", X, Y, HP, update_id="u")  # type: ignore[arg-type]
    assert result.duplicate and result.version == 7
    assert (store.commits, store.locks, counted["gradients"]) == (0, 0, 0)
    assert result.loss == pytest.approx(
        training.compute_loss(SPEC, store.read("m"), np.array(X, np.float32), np.array(Y, np.float32), HP)
    )


def test_a_duplicate_found_at_commit_time_changes_nothing(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)

    def twin(s: MemoryStore) -> None:  # the same update, delivered twice, won the race
        s.version += 1
        s.applied_ids["u"] = s.version

    store.rivals = [twin]
    result = train_step(store, "m", X, Y, HP, update_id="u")  # type: ignore[arg-type]
    assert result.duplicate and result.version == 1 and store.version == 1


def test_every_step_runs_inside_the_store_exclusive_section(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    train_step(store, "m", X, Y, HP, update_id="a")  # type: ignore[arg-type]
    train_step(store, "m", X, Y, HP, update_id="b")  # type: ignore[arg-type]
    assert store.locks == 2 and store.version == 2


def test_step_result_reports_its_costs_as_json() -> None:
    store = MemoryStore(SPEC)
    out = train_step(store, "m", X, Y, HP, update_id="a").to_json()  # type: ignore[arg-type]
    assert {"version", "loss", "attempts", "staleness", "duplicate", "conflicts", "recomputed", "latency_ms"} <= set(
        out
    )
    assert out["latency_ms"] >= 0


def test_a_step_result_is_strict_json_whatever_its_loss() -> None:
    for loss in (float("inf"), float("nan")):
        out = training.StepResult("m", 3, loss, 0, 0, True).to_json()
        assert out["loss"] is None and json.loads(json.dumps(out, allow_nan=False))["version"] == 3


# -- the report's pure parts (agent_workers/tools/report) ---------------------------------------------------------


def test_report_tables_replace_only_what_lies_between_the_markers() -> None:
    from agent_workers.tools.report import BEGIN_MARK, END_MARK, splice

    doc = f"# T\n\nprose\n\n{BEGIN_MARK}\nold table\n{END_MARK}\n\nmore prose\n"
    out = splice(doc, "new table\n")
    assert out == f"# T\n\nprose\n\n{BEGIN_MARK}\nnew table\n{END_MARK}\n\nmore prose\n"
    assert splice(out, "newer\n").count(BEGIN_MARK) == 1
    assert splice("# T\n", "t\n") == f"# T\n\n{BEGIN_MARK}\nt\n{END_MARK}\n"


def test_report_step_stats_count_conflicts_per_attempt_and_skip_duplicates_in_latency() -> None:
    from agent_workers.tools.report import layout, step_stats

    results = [
        {"attempts": 1, "conflicts": 0, "recomputed": 0, "staleness": 0, "latency_ms": 10.0, "duplicate": False},
        {"attempts": 3, "conflicts": 2, "recomputed": 1, "staleness": 2, "latency_ms": 30.0, "duplicate": False},
        {"attempts": 0, "conflicts": 0, "recomputed": 0, "staleness": 0, "latency_ms": 999.0, "duplicate": True},
    ]
    stats = step_stats(results, 2.0)
    assert (stats["steps"], stats["steps_per_s"], stats["conflict_rate"], stats["max_staleness"]) == (3, 1.5, 0.5, 2)
    assert stats["latency_p50_ms"] == 20.0 and stats["latency_p99_ms"] < 30.0 + 1e-9
    assert [layout(n) for n in (1, 2, 4, 8)] == [(1, 1), (2, 1), (4, 1), (4, 2)]
    assert stats["staleness"] == {"0": 2, "2": 1}


def test_report_counts_the_commits_of_grouped_steps() -> None:
    from agent_workers.tools.report import step_stats

    def step(version: int, staleness: int) -> dict[str, Any]:
        return {"attempts": 1, "conflicts": 0, "recomputed": 0, "staleness": staleness, "latency_ms": 5.0,
                "duplicate": False, "version": version}  # fmt: skip

    stats = step_stats([step(1, 0), step(1, 1), step(1, 2), step(2, 0)], 1.0)
    assert (stats["steps"], stats["commits"], stats["staleness"]) == (4, 2, {"0": 2, "1": 1, "2": 1})


def test_report_tables_keep_four_significant_digits() -> None:
    from agent_workers.tools.report.output import markdown_table

    md = markdown_table(
        ["run", "mse", "steps/s", "goal met"], [["a", 0.010234, 12345.6, "yes"], ["b", 1.5, None, "NO"]]
    )
    assert md.splitlines() == [
        "| run | mse | steps/s | goal met |",
        "| --- | ---: | ---: | --- |",
        "| a | 0.01023 | 12,346 | yes |",
        "| b | 1.5 | None | NO |",
    ]


# -- guards: finiteness, clipping, the epoch fence, deadlines, sizes ------------------------------------------------


def test_a_step_that_would_make_parameters_non_finite_commits_nothing() -> None:
    store = MemoryStore(SPEC)
    with pytest.raises(InputError, match="non-finite.*lr=1e\\+30"):
        train_step(store, "m", [[1e10, 1e10]], [[1e10]], HyperParams(lr=1e30), update_id="u")  # type: ignore[arg-type]
    assert (store.commits, store.version) == (0, 0)


def test_a_non_finite_gradient_names_the_data() -> None:
    store = MemoryStore(SPEC)
    with pytest.raises(InputError, match="gradient of this mini-batch is not finite"):
        train_step(store, "m", [[3e38, 3e38]], [[-3e38]], HP, update_id="u")  # type: ignore[arg-type]
    assert store.commits == 0


def test_a_step_whose_loss_overflows_but_whose_gradient_is_finite_commits_nothing() -> None:
    # mse with y = 1e30: the squared error overflows float32 (loss = inf) while the gradient, ~2e30, stays finite;
    # committed, it would move the model by ~1e29 and write a loss JSON cannot hold into the history.
    store = MemoryStore(SPEC)
    grads, loss = compute_gradient(SPEC, store.read("m"), np.array(X, np.float32), np.array([[1e30]], np.float32), HP)
    assert loss == float("inf") and all(bool(torch.isfinite(g).all()) for g in grads.values())
    with pytest.raises(InputError, match="mse loss of this mini-batch is not finite"):
        train_step(store, "m", X, [[1e30]], HP, update_id="u")  # type: ignore[arg-type]
    assert (store.commits, store.version, store.applied_ids) == (0, 0, {})


def test_max_grad_norm_clips_to_the_global_norm() -> None:
    clipped = optim.clip_gradient({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
    assert torch.allclose(torch.cat([clipped["a"], clipped["b"]]), torch.tensor([0.6, 0.8]))
    small = {"a": torch.tensor([0.1])}
    assert optim.clip_gradient(small, 1.0) is small
    assert HyperParams.from_json({"max_grad_norm": 2}).max_grad_norm == 2.0
    with pytest.raises(InputError, match="max_grad_norm"):
        HyperParams.from_json({"max_grad_norm": 0})


def test_clipping_lets_a_large_scale_step_commit_finite_parameters() -> None:
    store = MemoryStore(SPEC)
    hp = HyperParams(lr=0.01, max_grad_norm=1.0)
    result = train_step(store, "m", [[1e10, 1e10]], [[1e10]], hp, update_id="u")  # type: ignore[arg-type]
    assert result.version == 1
    assert all(bool(torch.isfinite(t).all()) for t in store.tensors.values())


def test_the_epoch_fence_holds_after_a_conflict(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)

    def recreate(s: MemoryStore) -> None:
        s.version += 1
        s.epoch = "recreated"

    store.rivals = [recreate]
    with pytest.raises(ModelError, match="recreated"):
        train_step(store, "m", X, Y, HP, update_id="u", max_staleness=4)  # type: ignore[arg-type]
    assert store.commits == 1 and store.epochs_committed == []


def test_a_step_past_its_deadline_commits_nothing() -> None:
    from celery.exceptions import TimeLimitExceeded

    store = MemoryStore(SPEC)
    with pytest.raises(TimeLimitExceeded, match="AGENT_WORKERS_TASK_TIME_LIMIT"):
        train_step(store, "m", X, Y, HP, update_id="u", deadline=time.monotonic() - 1)  # type: ignore[arg-type]
    assert store.commits == 0


def test_fit_stops_between_steps_at_its_deadline() -> None:
    from celery.exceptions import TimeLimitExceeded

    store = MemoryStore(SPEC)
    x, y = np.zeros((5, 2), np.float32), np.zeros((5, 1), np.float32)
    with pytest.raises(TimeLimitExceeded):
        training.fit(
            store,
            "m",
            x,
            y,
            HP,
            epochs=1,
            batch_size=1,
            update_prefix="f",  # type: ignore[arg-type]
            deadline=time.monotonic() - 1,
        )
    assert store.commits == 0


def test_mini_batches_over_the_element_limit_are_refused() -> None:
    with pytest.raises(InputError, match="AGENT_WORKERS_MAX_INPUT_ELEMENTS"):
        training.as_batch([[0.0] * 4] * 3, [[0.0]] * 3, max_elements=11)
    assert training.as_batch([[0.0] * 4] * 3, [[0.0]] * 3, max_elements=12)[0].shape == (3, 4)


def test_the_queued_part_splices_its_own_markers_and_reports_speedups_from_one_run() -> None:
    from agent_workers.tools.report import BEGIN_MARK, splice
    from agent_workers.tools.report.queued import QUEUED_BEGIN, QUEUED_END, render_queued, scaling

    def row(n: int, steps_per_s: float, ratio: float) -> dict[str, Any]:
        return {"optimizer": "adam", "path": "grouped", "mode": "optimistic", "trainers": n, "steps": 800,
                "ratio": ratio, "sequential_ratio": 1.0, "gap": round(ratio - 1.0, 4), "meets_goal": ratio <= 1.005,
                "steps_per_s": steps_per_s, "conflicts_per_step": 0.0, "recomputed": 0, "commits": 160}  # fmt: skip

    rows = [row(1, 200.0, 1.001), row(2, 330.0, 1.02)]
    assert scaling(rows) == [
        {"optimizer": "adam", "path": "grouped", "mode": "optimistic", "trainers": 1, "speedup": 1.0},
        {"optimizer": "adam", "path": "grouped", "mode": "optimistic", "trainers": 2, "speedup": 1.65},
    ]
    report = {"queued": rows, "finished": "now", "plan": {"queued_epochs": 10},
              "environment": {"cpus": 2, "broker": "redis", "max_staleness": 4}}  # fmt: skip
    table = render_queued(report)
    assert "| 1.65 |" in table and "| NO |" in table and "| yes |" in table
    doc = splice(f"# T\n\n{BEGIN_MARK}\nmain\n", "x")  # the main tables' block stays as it is
    out = splice(doc, table, begin=QUEUED_BEGIN, end=QUEUED_END)
    assert out.count(QUEUED_BEGIN) == 1 and "main" in out
    assert splice(out, "again\n", begin=QUEUED_BEGIN, end=QUEUED_END).count("| 1.65 |") == 0


@pytest.mark.parametrize("hparams", [["lr", 0.1], "lr=0.1", 3, [("lr", 0.1)]])
def test_hyperparameters_that_are_not_an_object_are_an_input_error(hparams: Any) -> None:
    with pytest.raises(InputError, match="hparams must be an object"):
        HyperParams.from_json(hparams)
    with pytest.raises(InputError, match="hyperparameter loss must be a name"):
        HyperParams.from_json({"loss": ["mse"]})


def test_fit_limits_the_width_of_y_per_step_and_checks_the_job_before_its_first_commit() -> None:
    store = MemoryStore(SPEC)
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(InputError, match="1000 numbers per row exceeds AGENT_WORKERS_MAX_INPUT_ELEMENTS=100"):
        training.fit(
            store, "m", x, np.zeros((10, 1000)), HP, epochs=1, batch_size=5, update_prefix="f", max_elements=100
        )  # type: ignore[arg-type]
    with pytest.raises(InputError, match="y has 3 target"):
        training.fit(store, "m", x, np.zeros((10, 3)), HP, epochs=1, batch_size=5, update_prefix="f")  # type: ignore[arg-type]
    assert store.commits == 0
    result = training.fit(
        store, "m", x, np.zeros((10, 1)), HP, epochs=1, batch_size=5, update_prefix="f", info={"upload": "u1"}
    )  # type: ignore[arg-type]
    assert result["steps"] == 2 and store.commits == 2
    assert all(info["upload"] == "u1" for info in store.infos)
