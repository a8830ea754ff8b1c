"""Training: losses, optimizers, regularizers, and the optimistic train step with its staleness rule.

A step reads version ``v``, computes the gradient of its mini-batch, applies the optimizer, and commits
``v + 1`` with compare-and-set. On conflict it backs off (full jitter), re-reads, and if the head moved by at most
``max_staleness`` versions applies the SAME gradient to the new parameters (bounded staleness, SSP style);
otherwise, or when a rollback happened since the gradient's version, it recomputes. After ``max_attempts``
commits it gives up with a :class:`StoreError`.

The update id (the Celery task id by default) makes a redelivered step apply exactly once: an id already applied
returns at once as a duplicate, and the commit script checks it again atomically.

In the store's ``lock`` mode the whole read-compute-commit cycle runs under the model's commit lock, so conflicts
only happen when a lock expired (the compare-and-set still fences that).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from agent_workers import metrics, numbers
from agent_workers.errors import InputError, ModelError, VersionConflictError
from agent_workers.models import ModelSpec
from agent_workers.padding import MASK_ARGUMENTS, Batch, call_module
from agent_workers.store.params import CommitOutcome, RedisParamStore
from agent_workers.training import columns, inputs
from agent_workers.training.datasets import epoch_batches, row_width
from agent_workers.training.optim import HyperParams, apply_update, check_finite, compute_gradient, compute_loss

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 64
BACKOFF_BASE = 0.002
BACKOFF_CAP = 0.05
#: The most epochs one fit job may ask for (a larger number is a mistake, not a plan).
MAX_EPOCHS = 1_000_000


def check_deadline(deadline: float | None, what: str) -> None:
    """Stop cooperatively once ``deadline`` (``time.monotonic()`` seconds) has passed.

    Raises:
        TimeLimitExceeded: naming ``AGENT_WORKERS_TASK_TIME_LIMIT``; what was committed before stays committed.
    """
    if deadline is not None and time.monotonic() > deadline:
        from celery.exceptions import TimeLimitExceeded

        raise TimeLimitExceeded(
            f"{what} ran past AGENT_WORKERS_TASK_TIME_LIMIT; stopped before its next commit (raise the limit, or "
            "split the job)"
        )


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What a train step did.

    Attributes:
        version: the version the step produced (for a duplicate: the one its first delivery produced).
        loss: the mini-batch loss at the parameters the gradient was computed on.
        attempts: commits tried (1 = no conflict).
        staleness: versions between the gradient's parameters and the ones it was applied to.
        duplicate: the update id had been applied before; nothing changed.
        conflicts: commits lost to another trainer (``attempts - 1`` unless it ended as a duplicate).
        recomputed: times the gradient was recomputed because it grew too stale (or a rollback intervened).
        latency_ms: from the step's start (lock wait included) to its commit, in milliseconds.
    """

    model: str
    version: int
    loss: float
    attempts: int
    staleness: int
    duplicate: bool
    conflicts: int = 0
    recomputed: int = 0
    latency_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The result as strict JSON: a loss that is not finite (a duplicate's loss, recomputed at today's
        parameters, can overflow) is ``None``, never the non-JSON token ``Infinity`` Celery's encoder would write."""
        out = dataclasses.asdict(self)
        if not math.isfinite(out["loss"]):
            out["loss"] = None
        return out


def train_step(
    store: RedisParamStore,
    model: str,
    x: Any,
    y: Any,
    hp: HyperParams,
    *,
    update_id: str,
    max_staleness: int = 4,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_elements: int | None = None,
    deadline: float | None = None,
    info: dict[str, Any] | None = None,
) -> StepResult:
    """One training step with compare-and-set, bounded staleness and bounded retries (see the module docstring).

    Args:
        store: the parameter store (its mode decides optimistic vs locked).
        update_id: stable across redeliveries of this step; empty disables exactly-once.
        max_staleness: τ, the most versions a gradient may lag the parameters it is applied to.
        max_attempts: commits to try before giving up.
        max_elements: the most numbers x (and y) may hold (``AGENT_WORKERS_MAX_INPUT_ELEMENTS``).
        deadline: ``time.monotonic()`` after which no commit is attempted (the task's time limit).
        info: extra fields of the commit record (the model's history).

    Raises:
        InputError: x or y malformed or too large, or an update that is not finite (nothing is committed).
        ModelError: unknown model, or recreated while the step ran.
        VersionConflictError: still conflicting after ``max_attempts``.
        TimeLimitExceeded: the deadline passed before the commit.
    """
    started = time.perf_counter()
    xa, ya = batch_of(store.spec(model), x, y, max_elements=max_elements)
    if update_id:
        done = store.applied(model, update_id)
        if done is not None:
            # A redelivery of a step already applied: report it without taking the lock or computing a gradient.
            snapshot = store.read(model)
            loss = compute_loss(store.spec(model, snapshot.epoch), snapshot, xa, ya, hp)
            metrics.COMMITS.labels(model, CommitOutcome.DUPLICATE.value).inc()
            return StepResult(model, done, loss, 0, 0, True, latency_ms=_ms_since(started))
    with store.exclusive(model):
        return _optimistic_step(
            store,
            model,
            xa,
            ya,
            hp,
            update_id=update_id,
            max_staleness=max_staleness,
            max_attempts=max_attempts,
            started=started,
            deadline=deadline,
            info=info,
        )


def _optimistic_step(
    store: RedisParamStore,
    model: str,
    xa: Batch,
    ya: np.ndarray,
    hp: HyperParams,
    *,
    update_id: str,
    max_staleness: int,
    max_attempts: int,
    started: float,
    deadline: float | None = None,
    info: dict[str, Any] | None = None,
) -> StepResult:
    snapshot = store.read(model)
    epoch = snapshot.epoch  # the incarnation the gradient belongs to: every commit is fenced by it
    spec = store.spec(model, epoch)
    check_rows(spec, xa)
    grads, loss = compute_gradient(spec, snapshot, xa, ya, hp)
    grad_version = snapshot.version
    conflicts = recomputed = 0
    for attempt in range(1, max_attempts + 1):
        staleness = snapshot.version - grad_version
        new = apply_update(snapshot, grads, hp)
        check_finite(grads, new, hp, loss=loss)
        check_deadline(deadline, f"train step {update_id or ''} on {model!r}")
        result = store.commit(
            model,
            expected=snapshot.version,
            tensors=new,
            update_id=update_id,
            epoch=epoch,
            info={**(info or {}), "loss": loss, "staleness": staleness},
        )
        metrics.COMMITS.labels(model, result.outcome.value).inc()
        if result.outcome is CommitOutcome.COMMITTED:
            metrics.STALENESS.labels(model).observe(staleness)
            metrics.PARAM_VERSION.labels(model).set(result.version)
            return StepResult(
                model, result.version, loss, attempt, staleness, False, conflicts, recomputed, _ms_since(started)
            )
        if result.outcome is CommitOutcome.DUPLICATE:
            return StepResult(model, result.version, loss, attempt, 0, True, conflicts, recomputed, _ms_since(started))
        conflicts += 1
        if attempt == max_attempts:
            break
        # Full jitter, capped: trainers that collided do not collide again in lockstep.
        time.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
        snapshot = store.read(model)
        if snapshot.epoch != epoch:
            raise ModelError(f"model {model!r} was recreated while this update was computed; it no longer applies")
        if snapshot.version - grad_version > max_staleness or grad_version < snapshot.barrier:
            grads, loss = compute_gradient(spec, snapshot, xa, ya, hp)
            grad_version = snapshot.version
            recomputed += 1
    raise VersionConflictError(
        f"train step on {model!r} still conflicted after {max_attempts} attempts; "
        "fewer concurrent trainers, AGENT_WORKERS_COMMIT_MODE=lock or a higher "
        "AGENT_WORKERS_MAX_STALENESS help",
        expected=snapshot.version,
        actual=result.version,
    )


def fit(
    store: RedisParamStore,
    model: str,
    x: np.ndarray,
    y: np.ndarray,
    hp: HyperParams,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    update_prefix: str,
    max_staleness: int = 4,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    progress_every: int = 10,
    max_elements: int | None = None,
    deadline: float | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole training job in this process: every mini-batch is one :func:`train_step`, committed on its own.

    Each step's update id is ``<update_prefix>:<epoch>:<step>``, so a re-run of the same job (a redelivered
    ``fit``) skips the steps it already committed.

    Args:
        on_progress: called every ``progress_every`` steps and after the last with
            ``{"epoch", "epochs", "step", "steps", "loss", "version"}``.
        max_elements: the most numbers one mini-batch may hold (``AGENT_WORKERS_MAX_INPUT_ELEMENTS``).
        deadline: ``time.monotonic()`` after which no further step starts (the task's time limit).
        info: added to every step's commit record (the model's history), e.g. the dataset upload trained on.

    Returns:
        ``{"model", "version", "steps", "history", "conflicts", "recomputed", "duplicates", "max_staleness_seen"}``;
        ``history`` has one ``{"epoch", "loss", "version"}`` per epoch (the mean mini-batch loss).

    Raises:
        InputError: ``epochs`` or ``batch_size`` not a positive integer, a mini-batch over ``max_elements``, or
            data that does not fit the model (checked before the first commit: nothing is half-trained).
        TimeLimitExceeded: the deadline passed; the steps committed so far stay committed (a redelivery skips them).
    """
    epochs = numbers.integer("epochs", epochs, low=1, high=MAX_EPOCHS)
    batch_size = numbers.integer("batch_size", batch_size, low=1)
    width = max(columns.row_width(x), row_width(y))
    if max_elements is not None and min(batch_size, columns.n_rows(x)) * width > max_elements:
        raise InputError(
            f"batch_size {batch_size} × {width} numbers per row exceeds AGENT_WORKERS_MAX_INPUT_ELEMENTS="
            f"{max_elements}; use a smaller batch_size"
        )
    check_job(store, model, x, y, hp)
    steps_per_epoch = (columns.n_rows(x) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    version = -1
    cost = {"conflicts": 0, "recomputed": 0, "duplicates": 0, "max_staleness_seen": 0}
    for done, (epoch, step, rows) in enumerate(
        epoch_batches(columns.n_rows(x), epochs=epochs, batch_size=batch_size, seed=seed), start=1
    ):
        check_deadline(deadline, f"fit {update_prefix} (step {done} of {total})")
        result = train_step(
            store,
            model,
            columns.take(x, rows),
            y[rows],
            hp,
            update_id=f"{update_prefix}:{epoch}:{step}",
            max_staleness=max_staleness,
            max_elements=max_elements,
            deadline=deadline,
            info=info,
        )
        losses.append(result.loss)
        version = result.version
        cost["conflicts"] += result.conflicts
        cost["recomputed"] += result.recomputed
        cost["duplicates"] += int(result.duplicate)
        cost["max_staleness_seen"] = max(cost["max_staleness_seen"], result.staleness)
        if on_progress is not None and (done % progress_every == 0 or done == total):
            on_progress(
                {
                    "epoch": epoch + 1,
                    "epochs": epochs,
                    "step": done,
                    "steps": total,
                    "loss": result.loss,
                    "version": version,
                }
            )
        if step == steps_per_epoch - 1:
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "version": version})
            losses = []
    return {"model": model, "version": version, "steps": total, "history": history, **cost}


def check_job(store: RedisParamStore, model: str, x: columns.Columns, y: np.ndarray, hp: HyperParams) -> None:
    """Check a whole job's data against the model before its first commit: x's rows against the model's input
    shape, y's rows against the loss and the model's output (for ``cross_entropy``: one class index per row, in
    range; for ``mse``: as many targets per row as outputs; any loss: the loss of the first row computes).

    Raises:
        InputError: naming what does not fit (and the first bad row where there is one).
    """
    snapshot = store.read(model)
    spec = store.spec(model, snapshot.epoch)
    first: Batch
    if spec.legacy and isinstance(x, np.ndarray):
        if x.shape[1:] != spec.input_shape:
            raise InputError(
                f"the dataset's rows have shape {list(x.shape[1:])}; model {model!r} takes {list(spec.input_shape)}"
            )
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        first = np.ascontiguousarray(x[:1], dtype=np.float32)
    else:
        inputs.check_columns(spec, x)
        finite = np.ones(len(y), dtype=bool)  # float columns were checked finite at upload
        first, _ = inputs.collate(spec, columns.take(x, np.arange(1)))
    finite &= np.isfinite(y).reshape(len(y), -1).all(axis=1)
    if not finite.all():
        raise InputError(f"row {int(np.flatnonzero(~finite)[0])} of the dataset holds NaN or infinity")
    outputs = _output_width(spec, snapshot, first)
    if hp.loss == "mse" and row_width(y) != outputs:
        raise InputError(f"y has {row_width(y)} target(s) per row; model {model!r} has {outputs} output(s) (mse loss)")
    if hp.loss == "cross_entropy":
        if row_width(y) != 1:
            raise InputError(
                f"y has {row_width(y)} numbers per row; the cross_entropy loss takes one class index per row"
            )
        labels = y.reshape(-1)
        bad = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels >= outputs))
        if len(bad):
            raise InputError(
                f"y row {int(bad[0])} is not one class index in [0, {outputs}) (cross_entropy loss of model "
                f"{model!r}); {len(bad)} bad row(s) in all"
            )
    compute_loss(spec, snapshot, first, y[:1], hp)  # any loss (plugins too): y against the output, on one row


def _output_width(spec: ModelSpec, snapshot: Any, x: Batch) -> int:
    import torch

    module = spec.build()
    module.load_state_dict(snapshot.parameters())
    with torch.no_grad():
        return int(np.prod(call_module(module, spec.signature, x).shape[1:]))


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def as_batch(x: Any, y: Any, *, max_elements: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a mini-batch from JSON: x a non-empty 2-D list of finite numbers, y one target per row, neither
    holding more than ``max_elements`` numbers."""
    try:
        with np.errstate(over="ignore"):  # past float32's range becomes inf, refused below
            xa = np.asarray(x, dtype=np.float32)
            ya = np.asarray(y, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: an int past the float range
        raise InputError(f"x and y must be numbers: {exc}") from None
    if xa.ndim < 2 or xa.shape[0] == 0:
        raise InputError(f"x must be a non-empty list of rows, got shape {list(xa.shape)}")
    if ya.shape[0] != xa.shape[0]:
        raise InputError(f"y has {ya.shape[0]} targets for {xa.shape[0]} rows")
    if max_elements is not None and max(xa.size, ya.size) > max_elements:
        raise InputError(
            f"this mini-batch holds {max(xa.size, ya.size)} numbers; the limit is {max_elements} "
            "(AGENT_WORKERS_MAX_INPUT_ELEMENTS): send smaller batches"
        )
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise InputError("x or y contain NaN or infinity (or a number past float32's range, 3.4e38)")
    return xa, ya


def batch_of(spec: ModelSpec, x: Any, y: Any, *, max_elements: int | None = None) -> tuple[Batch, np.ndarray]:
    """A mini-batch as the model trains on it: a message's ``x``/``y`` (JSON, in the tensor encodings) or rows
    selected from a dataset (numpy), decoded per the model's signature (agent_workers/training/inputs.py).

    A model of before signatures given rows (not a binary tensor) takes the float32 path of :func:`as_batch`,
    unchanged.

    Raises:
        InputError: naming what does not fit (input, row, dtype, shape, size, NaN/infinity).
    """
    if spec.legacy and not isinstance(x, Mapping):
        return as_batch(x, y, max_elements=max_elements)
    limit = max_elements if max_elements is not None else 2**62
    part = x if _is_part(x) else inputs.decode_x(spec, x, max_elements=limit)
    batch, rows = inputs.collate(spec, part)
    size = sum(batch[t.name].size for t in spec.signature.inputs)
    if max_elements is not None and size > max_elements:
        raise InputError(
            f"this mini-batch holds {size} numbers (padded); the limit is {max_elements} "
            "(AGENT_WORKERS_MAX_INPUT_ELEMENTS): send smaller batches"
        )
    ya = inputs.decode_y(y, rows, max_elements=max_elements)
    if spec.legacy:  # a binary tensor of float32 rows: the legacy model's one array, as as_batch gives it
        return batch[spec.signature.inputs[0].name], ya
    return batch, ya


def _is_part(x: Any) -> bool:
    """Rows already decoded (selected from a dataset): an array, a list of arrays, or name -> one of those."""
    if isinstance(x, np.ndarray):
        return True
    if isinstance(x, list):
        return bool(x) and all(isinstance(r, np.ndarray) for r in x)
    return isinstance(x, dict) and bool(x) and all(_is_part(v) for v in x.values())


def check_rows(spec: ModelSpec, x: Batch) -> None:
    """A decoded batch fits the model: a legacy array's rows the input shape, a typed batch the input names.

    Raises:
        InputError: naming the expected shape or names.
    """
    if isinstance(x, np.ndarray):
        if x.shape[1:] != spec.input_shape:
            raise InputError(f"x rows must have shape {list(spec.input_shape)}, got {list(x.shape[1:])}")
        return
    names = {t.name for t in spec.signature.inputs}
    if names - set(x):
        raise InputError(f"x names inputs {sorted(set(x) - set(MASK_ARGUMENTS))}; the model takes {sorted(names)}")
