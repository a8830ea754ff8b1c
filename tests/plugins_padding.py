"""Test plugin of a variable-length model (``AGENT_WORKERS_PLUGINS=tests.plugins_padding``), for contract 1.3.

* ``mask_echo``: int64 ``input_ids`` [-1] -> float32 ``length`` [1], the sum of the ``attention_mask`` the worker
  hands it, and int64 ``kept`` [-1], the ids where the mask is 1 (0 elsewhere), cut back to the request's length:
  what the model saw of each request, exactly.
"""

from __future__ import annotations

import torch

from agent_workers.models import register_architecture

MASK_ECHO_SIGNATURE = {
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]}],
    "outputs": [
        {"name": "length", "dtype": "float32", "shape": [1]},
        {"name": "kept", "dtype": "int64", "shape": [-1]},
    ],
}


class MaskEcho(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert attention_mask.shape == input_ids.shape, (attention_mask.shape, input_ids.shape)
        length = attention_mask.sum(dim=1, keepdim=True).float() * self.scale
        return length, input_ids * attention_mask


@register_architecture("mask_echo", signature=MASK_ECHO_SIGNATURE)
def build_mask_echo() -> torch.nn.Module:
    return MaskEcho()
