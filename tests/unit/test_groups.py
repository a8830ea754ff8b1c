"""Group commit on an in-memory store: k sequential steps, one commit, each update id applied once, a conflict
rebased within τ (recomputed beyond it), the epoch fence exact, a non-finite step failing alone."""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any

import numpy as np
import pytest
import torch

from agent_workers.errors import InputError, ModelError
from agent_workers.models import make_spec
from agent_workers.store.blobs import PARAM_PREFIX, Snapshot
from agent_workers.training import groups
from agent_workers.training import steps as training
from agent_workers.training.groups import Step, group_step
from agent_workers.training.steps import HyperParams, StepResult, apply_update, compute_gradient
from tests.unit.test_training import MemoryStore

SPEC = make_spec("linear", in_features=3, out_features=2)


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
        groups, "time", types.SimpleNamespace(sleep=seen["sleeps"].append, perf_counter=__import__("time").perf_counter)
    )
    return seen


def make_steps(k: int, ids: list[str] | None = None, seed: int = 0) -> list[Step]:
    rng = np.random.default_rng(seed)
    ids = ids or [f"u{i}" for i in range(k)]
    return [
        Step(u, rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32))
        for u in ids
    ]


def results(answers: list[Any]) -> list[StepResult]:
    assert all(isinstance(a, StepResult) for a in answers), answers
    return answers


@pytest.mark.parametrize(
    "hp",
    [HyperParams(optimizer="adam", lr=0.01), HyperParams(optimizer="sgd", lr=0.05, momentum=0.9, l2=0.01)],
    ids=["adam", "sgd-momentum-l2"],
)
def test_a_group_is_exactly_k_sequential_optimizer_steps(hp: HyperParams, counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    start = Snapshot("m", 0, "e", dict(store.tensors))
    steps = make_steps(4)
    answers = results(group_step(store, "m", steps, hp, max_staleness=4))  # type: ignore[arg-type]

    # Sequential single-process torch: each batch's gradient at the parameters the batches before it left.
    module = SPEC.build()
    module.load_state_dict(start.parameters())
    if hp.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(module.parameters(), lr=hp.lr)
    else:
        opt = torch.optim.SGD(module.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.l2)
    for step in steps:
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(torch.from_numpy(step.x)), torch.from_numpy(step.y)).backward()
        opt.step()
    for name, p in module.named_parameters():
        torch.testing.assert_close(store.tensors[PARAM_PREFIX + name], p.detach(), rtol=1e-5, atol=1e-6)
    if hp.optimizer == "adam":
        assert int(store.tensors["o.adam.step"][0]) == 4

    assert store.commits == 1 and store.version == 1 and counted["gradients"] == 4
    assert [r.version for r in answers] == [1, 1, 1, 1]
    assert [r.staleness for r in answers] == [0, 0, 0, 0]
    assert not any(r.duplicate for r in answers)
    assert store.applied_ids == {f"u{i}": 1 for i in range(4)}
    assert store.infos[0]["steps"] == 4 and store.infos[0]["staleness"] == 0


def test_an_update_id_is_applied_once_whether_applied_before_or_repeated_in_the_group(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    store.applied_ids["old"] = 7
    steps = make_steps(4, ["a", "b", "a", "old"])
    hp = HyperParams(lr=0.1)
    answers = results(group_step(store, "m", steps, hp))  # type: ignore[arg-type]
    assert [(r.version, r.duplicate) for r in answers] == [(1, False), (1, False), (1, True), (7, True)]
    # Exactly two updates went in: a, then b at the parameters a left.
    expected = MemoryStore(SPEC).read("m")
    for s in steps[:2]:
        grads, _ = compute_gradient(SPEC, expected, s.x, s.y, hp)
        expected = Snapshot("m", 0, "e", apply_update(expected, grads, hp))
    for name, t in expected.tensors.items():
        torch.testing.assert_close(store.tensors[name], t)
    assert store.commits == 1 and store.applied_ids == {"old": 7, "a": 1, "b": 1}


def test_a_step_applied_meanwhile_is_dropped_and_the_rest_commit_once(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)

    def redelivery_won(s: MemoryStore) -> None:  # b, delivered twice, was committed by another worker
        s.version += 1
        s.applied_ids["b"] = s.version

    store.rivals = [redelivery_won]
    answers = results(group_step(store, "m", make_steps(3, ["a", "b", "c"]), HyperParams(lr=0.1)))  # type: ignore[arg-type]
    assert [(r.version, r.duplicate) for r in answers] == [(2, False), (1, True), (2, False)]
    assert [answers[0].staleness, answers[2].staleness] == [1, 1]  # one step (b's) under them
    assert store.version == 2 and store.applied_ids == {"b": 1, "a": 2, "c": 2}
    assert counted["gradients"] == 3  # within τ: reused


def rebased(steps: list[Step], hp: HyperParams, rival: Any, stale: int) -> dict[str, torch.Tensor]:
    """The group's first-walk gradients re-applied in order, at the staleness-aware rate, onto the rival's head."""
    first = MemoryStore(SPEC).read("m")
    grads = []
    for s in steps:
        g, _ = compute_gradient(SPEC, first, s.x, s.y, hp)
        grads.append(g)
        first = Snapshot("m", 0, "e", apply_update(first, g, hp))
    head = MemoryStore(SPEC)
    rival(head)
    expected = head.read("m")
    for g in grads:
        expected = Snapshot("m", 0, "e", apply_update(expected, g, groups.stale_hparams(hp, stale)))
    return expected.tensors


@pytest.mark.parametrize(("moved", "recomputed"), [(1, 0), (2, 1)])
def test_after_a_conflict_the_group_is_rebased_within_tau_steps_and_recomputed_beyond(
    moved: int, recomputed: int, counted: dict[str, Any]
) -> None:
    store = MemoryStore(SPEC)
    rival = store.rival_commits(moved, steps=2 * moved)
    store.rivals = [rival]
    hp = HyperParams(lr=0.1)
    steps = make_steps(2)
    answers = results(group_step(store, "m", steps, hp, max_staleness=2))  # type: ignore[arg-type]
    # τ = 2 steps: a rival's one version of 2 steps under the group takes its gradients re-applied in order (at
    # half the rate); two versions of 4 steps, the walk is recomputed there.
    assert [r.recomputed for r in answers] == [recomputed] * 2
    assert counted["gradients"] == 2 * (1 + recomputed)
    assert [r.staleness for r in answers] == [2 * moved * (1 - recomputed)] * 2
    if not recomputed:
        for name, t in rebased(steps, hp, rival, stale=2).items():
            torch.testing.assert_close(store.tensors[name], t)
    assert all(r.version == moved + 1 and r.conflicts == 1 and r.attempts == 2 for r in answers)
    assert len(counted["sleeps"]) == 1


@pytest.mark.parametrize(
    ("versions", "rival_steps", "recomputed"),
    [(1, 6, 1), (3, 3, 0)],
    ids=["one-big-group-recomputes", "three-single-steps-rebase"],
)
def test_staleness_counts_the_steps_other_trainers_committed_not_versions_times_k(
    versions: int, rival_steps: int, recomputed: int, counted: dict[str, Any]
) -> None:
    store = MemoryStore(SPEC)
    rival = store.rival_commits(versions, steps=rival_steps)
    store.rivals = [rival]
    hp = HyperParams(lr=0.1)
    steps = make_steps(2)
    answers = results(group_step(store, "m", steps, hp, max_staleness=4))  # type: ignore[arg-type]
    # A group of 2 under one version of 6 steps is 6 steps stale (> τ = 4), not 1 × 2; under three versions of one
    # step each it is 3 steps stale (<= τ: rebased at a third of the rate), not 3 × 2.
    assert [r.recomputed for r in answers] == [recomputed] * 2
    assert [r.staleness for r in answers] == [0 if recomputed else rival_steps] * 2
    if not recomputed:
        for name, t in rebased(steps, hp, rival, stale=rival_steps).items():
            torch.testing.assert_close(store.tensors[name], t)


@pytest.mark.parametrize(("stale", "lr"), [(0, 0.3), (1, 0.3), (2, 0.15), (3, 0.1)])
def test_a_stale_gradient_is_reapplied_with_the_rate_divided_by_its_staleness(stale: int, lr: float) -> None:
    hp = HyperParams(optimizer="adam", lr=0.3, betas=(0.8, 0.9))
    scaled = groups.stale_hparams(hp, stale)
    assert scaled.lr == pytest.approx(lr)
    assert dataclasses.replace(scaled, lr=hp.lr) == hp  # nothing else changes


def test_a_rollback_after_the_snapshot_forces_a_recompute(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    store.rivals = [store.rival_commits(1, rollback=True)]
    answers = results(group_step(store, "m", make_steps(2), HyperParams(lr=0.1), max_staleness=4))  # type: ignore[arg-type]
    assert [r.staleness for r in answers] == [0, 0] and answers[0].recomputed == 1
    assert counted["gradients"] == 4


def test_a_model_recreated_during_the_group_fails_every_step_and_commits_nothing(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)

    def recreate(s: MemoryStore) -> None:
        s.version += 1
        s.epoch = "other"

    store.rivals = [recreate]
    answers = group_step(store, "m", make_steps(3), HyperParams(lr=0.1))  # type: ignore[arg-type]
    assert all(isinstance(a, ModelError) for a in answers)
    assert store.applied_ids == {} and store.epochs_committed == []


def test_a_non_finite_step_fails_alone_and_the_rest_commit(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    steps = make_steps(3)
    steps[1] = Step("huge", np.full((5, 3), 1e30, np.float32), np.full((5, 2), 1e30, np.float32))
    bad_shape = Step("shape", np.zeros((2, 4), np.float32), np.zeros((2, 2), np.float32))
    answers = group_step(store, "m", [*steps, bad_shape], HyperParams(lr=0.1))  # type: ignore[arg-type]
    assert isinstance(answers[1], InputError) and "not finite" in str(answers[1])
    assert isinstance(answers[3], InputError) and "shape" in str(answers[3])
    good = results([answers[0], answers[2]])
    assert [(r.version, r.staleness) for r in good] == [(1, 0), (1, 0)]
    assert set(store.applied_ids) == {"u0", "u2"}
    assert all(bool(torch.isfinite(t).all()) for t in store.tensors.values())


def test_a_step_whose_loss_overflows_fails_alone_and_the_group_commits_finite_history(
    counted: dict[str, Any],
) -> None:
    store = MemoryStore(SPEC)
    steps = make_steps(3)
    steps[1] = Step("inf-loss", steps[1].x, np.full((5, 2), 1e30, np.float32))  # finite gradient, loss = inf
    answers = group_step(store, "m", steps, HyperParams(lr=0.1))  # type: ignore[arg-type]
    assert isinstance(answers[1], InputError) and "loss of this mini-batch is not finite" in str(answers[1])
    good = results([answers[0], answers[2]])
    assert [(r.version, r.staleness) for r in good] == [(1, 0), (1, 0)]
    assert set(store.applied_ids) == {"u0", "u2"}
    assert all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < 100 for t in store.tensors.values())
    # The history record and every result are strict JSON: no Infinity or NaN token anywhere.
    json.dumps(store.infos, allow_nan=False)
    json.dumps([r.to_json() for r in good], allow_nan=False)


def test_a_group_larger_than_tau_walks_sequentially_and_commits_once(counted: dict[str, Any]) -> None:
    store = MemoryStore(SPEC)
    answers = results(group_step(store, "m", make_steps(6), HyperParams(lr=0.1), max_staleness=1))  # type: ignore[arg-type]
    assert [(r.version, r.staleness) for r in answers] == [(1, 0)] * 6 and store.commits == 1
