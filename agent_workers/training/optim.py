"""The arithmetic of a training step: losses (a registry), hyperparameters, the gradient of a mini-batch, one
optimizer step (SGD with momentum or Adam, L1/L2, gradient clipping) applied to a snapshot, and the finiteness check
that keeps NaN and infinity out of the store. No Redis, no queue: :mod:`agent_workers.training.steps` runs these under
compare-and-set, :mod:`agent_workers.training.groups` several at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from agent_workers import numbers
from agent_workers.errors import InputError
from agent_workers.models import ModelSpec
from agent_workers.padding import Batch, call_module
from agent_workers.store.blobs import PARAM_PREFIX, Snapshot

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LOSSES: dict[str, Loss] = {}


def register_loss(name: str) -> Callable[[Loss], Loss]:
    """Register ``loss(output, target) -> scalar tensor`` under ``name``; usable as a decorator."""

    def decorate(fn: Loss) -> Loss:
        _LOSSES[name] = fn
        return fn

    return decorate


@register_loss("mse")
def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target.reshape(output.shape).to(output.dtype))


@register_loss("cross_entropy")
def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output, target.reshape(-1).long())


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperParams:
    """Per-job training hyperparameters.

    Attributes:
        loss: ``mse`` or ``cross_entropy`` (or a registered one).
        optimizer: ``sgd`` or ``adam``.
        lr: learning rate.
        momentum: SGD momentum (0 = plain SGD).
        betas: Adam's moment decay rates.
        eps: Adam's denominator guard.
        l1: L1 penalty weight.
        l2: L2 penalty weight (weight decay).
        max_grad_norm: clip the mini-batch gradient to this global L2 norm before the optimizer sees it
            (``None``: no clipping).
    """

    loss: str = "mse"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    l1: float = 0.0
    l2: float = 0.0
    max_grad_norm: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HyperParams:
        """Parse hyperparameters from a job's JSON, refusing unknown names and values."""
        if data is not None and not isinstance(data, dict):
            raise InputError(f"hparams must be an object of hyperparameters, got {type(data).__name__}")
        data = dict(data or {})
        for name in ("loss", "optimizer"):
            if name in data and not isinstance(data[name], str):
                raise InputError(f"hyperparameter {name} must be a name (a string), got {type(data[name]).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(known)}")
        try:
            if data.get("max_grad_norm") is None:
                data.pop("max_grad_norm", None)
            for name in ("lr", "momentum", "eps", "l1", "l2", "max_grad_norm"):
                if name in data:
                    data[name] = _number(name, data[name])
            if "betas" in data:
                data["betas"] = tuple(_number("betas", b) for b in data["betas"])
            hp = cls(**data)
        except TypeError as exc:
            raise InputError(f"bad hyperparameters: {exc}") from None
        if hp.loss not in _LOSSES:
            raise InputError(f"unknown loss {hp.loss!r}; known: {sorted(_LOSSES)}")
        if hp.optimizer not in {"sgd", "adam"}:
            raise InputError(f"unknown optimizer {hp.optimizer!r}; use sgd or adam")
        if not hp.lr > 0:
            raise InputError(f"lr must be > 0, got {hp.lr}")
        if not 0 <= hp.momentum < 1:
            raise InputError(f"momentum must be in [0, 1), got {hp.momentum}")
        if len(hp.betas) != 2 or not all(0 <= b < 1 for b in hp.betas):
            raise InputError(f"betas must be two numbers in [0, 1), got {list(hp.betas)}")
        if hp.max_grad_norm is not None and not hp.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be > 0 (or null), got {hp.max_grad_norm}")
        if not hp.eps > 0 or hp.l1 < 0 or hp.l2 < 0:
            raise InputError(f"eps must be > 0 and l1, l2 >= 0; got eps={hp.eps}, l1={hp.l1}, l2={hp.l2}")
        return hp


def _number(name: str, value: Any) -> float:
    return numbers.finite(f"hyperparameter {name}", value)


def _loss(
    spec: ModelSpec, snapshot: Snapshot, x: Batch, y: np.ndarray, hp: HyperParams
) -> tuple[torch.nn.Module, torch.Tensor]:
    module = spec.build()
    module.load_state_dict(snapshot.parameters())
    module.train()
    if isinstance(x, np.ndarray):  # a legacy model's rows: float32, as always
        x = np.ascontiguousarray(x, dtype=np.float32)
    output = call_module(module, spec.signature, x)
    try:
        return module, _LOSSES[hp.loss](output, torch.from_numpy(np.asarray(y)))
    except (RuntimeError, ValueError, IndexError) as exc:
        # torch's own words (a reshape that cannot fit, a class index out of range) with what to compare.
        raise InputError(
            f"y of shape {list(np.shape(y))} does not fit the {hp.loss} loss of a model whose output has shape "
            f"{list(output.shape)}: {str(exc).splitlines()[0]}"
        ) from None


def compute_loss(spec: ModelSpec, snapshot: Snapshot, x: Batch, y: np.ndarray, hp: HyperParams) -> float:
    """The mini-batch loss at ``snapshot`` (forward pass only; regularizers excluded, as in the step's report)."""
    with torch.no_grad():
        return float(_loss(spec, snapshot, x, y, hp)[1])


def compute_gradient(
    spec: ModelSpec, snapshot: Snapshot, x: Batch, y: np.ndarray, hp: HyperParams
) -> tuple[dict[str, torch.Tensor], float]:
    """Gradient of the mini-batch loss at ``snapshot``; returns (grads by name, loss).

    The L1/L2 terms are not in this gradient: :func:`apply_update` adds them to it (``l2·p`` and
    ``l1·sign(p)``), so a reused stale gradient is regularized at the parameters it is applied to.
    """
    module, loss = _loss(spec, snapshot, x, y, hp)
    module.zero_grad()
    loss.backward()
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for name, p in module.named_parameters()
    }
    return grads, float(loss.detach())


def apply_update(snapshot: Snapshot, grads: dict[str, torch.Tensor], hp: HyperParams) -> dict[str, torch.Tensor]:
    """Apply one optimizer step to a snapshot; returns the complete new tensor set (params + optimizer state)."""
    tensors = {k: v.clone() for k, v in snapshot.tensors.items()}
    prefix = f"o.{hp.optimizer}."
    step_key = prefix + "step"
    step = int(tensors.get(step_key, torch.zeros(1))[0]) + 1
    tensors[step_key] = torch.tensor([step], dtype=torch.float64)
    if hp.max_grad_norm is not None:
        grads = clip_gradient(grads, hp.max_grad_norm)
    for name, g in grads.items():
        p = tensors[PARAM_PREFIX + name]
        g = g.to(p.dtype)
        if hp.l2:
            g = g + hp.l2 * p
        if hp.l1:
            g = g + hp.l1 * torch.sign(p)
        if hp.optimizer == "sgd":
            if hp.momentum:
                buf_key = f"{prefix}buf.{name}"
                buf = tensors.get(buf_key)
                buf = g.clone() if buf is None else hp.momentum * buf + g
                tensors[buf_key] = buf
                g = buf
            tensors[PARAM_PREFIX + name] = p - hp.lr * g
        else:
            b1, b2 = hp.betas
            m_key, v_key = f"{prefix}m.{name}", f"{prefix}v.{name}"
            m = b1 * tensors.get(m_key, torch.zeros_like(p)) + (1 - b1) * g
            v = b2 * tensors.get(v_key, torch.zeros_like(p)) + (1 - b2) * g * g
            tensors[m_key], tensors[v_key] = m, v
            m_hat = m / (1 - b1**step)
            v_hat = v / (1 - b2**step)
            tensors[PARAM_PREFIX + name] = p - hp.lr * m_hat / (v_hat.sqrt() + hp.eps)
    return tensors


def clip_gradient(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Scale ``grads`` down so their global L2 norm is at most ``max_norm`` (as ``clip_grad_norm_`` does)."""
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    if not torch.isfinite(total) or total <= max_norm:
        return grads  # a non-finite gradient is refused by check_finite, not hidden by scaling
    scale = max_norm / float(total)
    return {name: g * scale for name, g in grads.items()}


def check_finite(
    grads: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], hp: HyperParams, *, loss: float
) -> None:
    """Refuse an update that would put NaN or infinity into the store or its history, naming what to change.

    The loss is checked as well as the gradient: with mse and targets near float32's limit the loss overflows to
    infinity while its gradient stays finite, and such a step would move the model by ~1e30 and write a loss that
    JSON cannot hold into the history.

    Raises:
        InputError: the loss or the gradient (the data's scale) or the updated parameters (the hyperparameters) are
            not finite.
    """
    bad = sorted(name for name, g in grads.items() if not bool(torch.isfinite(g).all()))
    if bad:
        raise InputError(
            f"the gradient of this mini-batch is not finite (NaN or infinity in {', '.join(bad)}): x or y are "
            "too large for this model; scale the data, or set max_grad_norm; nothing was committed"
        )
    if not math.isfinite(loss):
        raise InputError(
            f"the {hp.loss} loss of this mini-batch is not finite ({loss}): x or y are too large for this model; "
            "scale the data; nothing was committed"
        )
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise InputError(
            f"this update makes {', '.join(bad[:4])} non-finite (lr={hp.lr:g}, optimizer={hp.optimizer}): lower lr "
            "or set max_grad_norm; nothing was committed and the model keeps its current version"
        )
