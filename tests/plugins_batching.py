"""A test plugin (AGENT_WORKERS_PLUGINS=tests.plugins_batching): a model that raises on some inputs."""

from __future__ import annotations

import torch

from agent_workers.models import ModelSpec, make_spec, register_architecture


class Picky(torch.nn.Module):
    """Adds its two inputs; raises if any row's first feature is negative (to exercise bisection)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] < 0).any()):
            raise ValueError("negative input")
        return (x.sum(dim=1, keepdim=True) * self.scale)


@register_architecture("picky")
def build_picky(*, in_features: int = 2) -> torch.nn.Module:
    return Picky()


def picky_spec() -> ModelSpec:
    return make_spec("picky", in_features=2)
