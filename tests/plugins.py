"""Test plugin for training workers (``AGENT_WORKERS_PLUGINS=tests.plugins``).

* ``counter`` architecture: one parameter vector ``value`` that every example reads as its output.
* ``counter`` loss: ``-(output · target).sum()``, so the gradient of ``value`` is ``-sum(targets)`` and one SGD
  step with ``lr=1`` ADDS the batch's targets to every element. A model trained with deltas d1..dn must end at
  exactly their sum, whatever the interleaving and staleness: any lost or doubled update shows.
* A pause hook: a step (or a group commit holding a step) whose update id starts with :data:`PAUSE_BEFORE` or
  :data:`PAUSE_AFTER` stops right before / right after its compare-and-set, reports that on a Redis list, and
  waits there (the first delivery only), so a test can SIGKILL the worker at exactly that point.
"""

from __future__ import annotations

from typing import Any

import torch

from agent_workers.models import register_architecture
from agent_workers.store.params import RedisParamStore
from agent_workers.training.optim import register_loss

PAUSE_BEFORE = "pause-before-cas:"
PAUSE_AFTER = "pause-after-cas:"
PAUSE_SECONDS = 120


class Counter(torch.nn.Module):
    """``value`` broadcast to every example: output[i] == value."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)


@register_architecture("counter")
def build_counter(*, in_features: int = 1, size: int = 1) -> torch.nn.Module:
    del in_features  # the input only sets the batch size
    return Counter(size)


@register_loss("counter")
def counter_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(output * target.reshape(output.shape[0], -1).to(output.dtype)).sum()


def reached_key(namespace: str) -> str:
    """The list a paused step pushes its update id to."""
    return f"{namespace}:test:paused"


def _pause(store: RedisParamStore, update_id: str) -> None:
    ns = store.keys.namespace
    # Only the first delivery pauses; the redelivery after the kill must run through.
    if store.client.set(f"{ns}:test:pause-once:{update_id}", 1, nx=True, ex=600):
        store.client.lpush(reached_key(ns), update_id)
        store.client.blpop([f"{ns}:test:never-released"], timeout=PAUSE_SECONDS)


_original_cas = RedisParamStore._cas


def _cas_with_pause(self: RedisParamStore, *, keys: list[str], args: list[Any]) -> list[Any]:
    # A group commit carries its first update id at args[1] and the others after the script's 11 fixed arguments.
    ids = [str(a) for a in (args[1], *args[11:])]
    before = next((i for i in ids if i.startswith(PAUSE_BEFORE)), None)
    after = next((i for i in ids if i.startswith(PAUSE_AFTER)), None)
    if before is not None:
        _pause(self, before)
    result = _original_cas(self, keys=keys, args=args)
    if after is not None:
        _pause(self, after)
    return result


RedisParamStore._cas = _cas_with_pause  # type: ignore[method-assign]
