"""A test plugin (AGENT_WORKERS_PLUGINS=tests.plugins_batching): models that misbehave on purpose.

Each adds its inputs (``x.sum(dim=1) * scale``, scale 1), so outputs are exact; they differ only in what
:meth:`Adder.check` does to the batch first.
"""

from __future__ import annotations

import os
import time

import torch

from agent_workers.models import ModelSpec, make_spec, register_architecture


class Adder(torch.nn.Module):
    """Adds its inputs per row, after :meth:`check` saw the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def check(self, x: torch.Tensor) -> None:
        """What a misbehaving model does to the batch before computing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return x.sum(dim=1, keepdim=True) * self.scale


class Picky(Adder):
    """Raises if any row's first feature is negative (to exercise bisection)."""

    def check(self, x: torch.Tensor) -> None:
        if bool((x[:, 0] < 0).any()):
            raise ValueError("negative input")


class Crashy(Adder):
    """Kills its own process when a row's first feature is 666 (a poison request)."""

    def check(self, x: torch.Tensor) -> None:
        if bool((x[:, 0] == 666).any()):
            os._exit(17)


class Slow(Adder):
    """Takes 20 ms per batch, to keep a worker busy long enough to be killed mid-load."""

    def check(self, x: torch.Tensor) -> None:
        time.sleep(0.02)  # noqa: sleep-ok - the model under test simulating 20 ms of work


class Sleepy(Adder):
    """Takes 300 ms per batch, so the learned cost model predicts that a tight deadline cannot be met."""

    def check(self, x: torch.Tensor) -> None:
        time.sleep(0.3)  # noqa: sleep-ok - the model under test simulating 300 ms of work


class Order(torch.nn.Module):
    """Reports where each row sat in its batch: ``[position, batch signature]``, the signature being the sum of
    ``2 ** x[:, 0]`` over the batch (rows sent with distinct small integers there name their batch exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = torch.arange(x.shape[0], dtype=x.dtype).unsqueeze(1)
        signature = torch.pow(2.0, x[:, 0]).sum().expand(x.shape[0], 1)
        return torch.cat([position, signature], dim=1) * self.scale


register_architecture("order")(lambda *, in_features=2: Order())


class Drowsy(Adder):
    """Takes as many seconds as the largest second feature of its batch, on the worker's event loop (a long forward
    pass: the worker must keep its heartbeat while it computes)."""

    def check(self, x: torch.Tensor) -> None:
        time.sleep(max(0.0, float(x[:, 1].max())))  # noqa: sleep-ok - the model under test simulating long work


class GilHog(Adder):
    """Holds the GIL for as many seconds as the largest second feature of its batch: libc's ``usleep`` called
    through ``ctypes.PyDLL``, which (unlike ``CDLL``) keeps the GIL, as a C extension that never releases it does.
    Every thread of the worker stops meanwhile."""

    def check(self, x: torch.Tensor) -> None:
        import ctypes
        import ctypes.util

        libc = ctypes.PyDLL(ctypes.util.find_library("c"))
        libc.usleep(int(max(0.0, float(x[:, 1].max())) * 1_000_000))


#: A row whose first feature is this makes :class:`Gated` wait for the test.
GATE = 1000.0


def gate_keys(namespace: str) -> tuple[str, str]:
    """Redis lists of :class:`Gated`: (pushed when a gated batch entered forward, pushed by the test to let it go)."""
    return f"{namespace}:test:gate:entered", f"{namespace}:test:gate:open"


class Gated(Adder):
    """A batch with a :data:`GATE` row says so in Redis, then computes only once the test lets it go."""

    def check(self, x: torch.Tensor) -> None:
        if bool((x[:, 0] == GATE).any()):
            import redis

            client = redis.Redis.from_url(os.environ["AGENT_WORKERS_PARAMS_URL"])
            entered, go = gate_keys(os.environ["AGENT_WORKERS_NAMESPACE"])
            client.rpush(entered, 1)
            client.blpop([go], timeout=60)  # bounded, so a failed test never leaves a worker stuck


for _name, _cls in {
    "picky": Picky,
    "crashy": Crashy,
    "slow": Slow,
    "sleepy": Sleepy,
    "drowsy": Drowsy,
    "gil-hog": GilHog,
    "held": Gated,
}.items():
    register_architecture(_name)(lambda *, in_features=2, _cls=_cls: _cls())  # noqa: B023 - bound by default


def picky_spec() -> ModelSpec:
    return make_spec("picky", in_features=2)


def crashy_spec() -> ModelSpec:
    return make_spec("crashy", in_features=2)
