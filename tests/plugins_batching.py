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


class Crashy(torch.nn.Module):
    """Adds its two inputs; kills its own process when a row's first feature is 666 (a poison request)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == 666).any()):
            import os

            os._exit(17)
        return x.sum(dim=1, keepdim=True) * self.scale


@register_architecture("crashy")
def build_crashy(*, in_features: int = 2) -> torch.nn.Module:
    return Crashy()


def crashy_spec() -> ModelSpec:
    return make_spec("crashy", in_features=2)


class Slow(torch.nn.Module):
    """Adds its two inputs, taking 20 ms per batch (to keep a worker busy long enough to be killed mid-load)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.02)  # noqa: sleep-ok - the model under test simulating 20 ms of work
        return x.sum(dim=1, keepdim=True) * self.scale


@register_architecture("slow")
def build_slow(*, in_features: int = 2) -> torch.nn.Module:
    return Slow()
