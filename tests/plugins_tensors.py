"""Test plugin of typed models (``AGENT_WORKERS_PLUGINS=tests.plugins_tensors``), for contract 1.2's tensors.

* ``tiny_cnn``: uint8 ``pixels`` [3, 8, 8] -> float32 ``logits`` [4] (a small CNN scaling its bytes to [0, 1]).
* ``two_input``: int64 ``ids`` [-1] and bool ``mask`` [-1] -> float32 ``pooled`` [4] (the masked mean of the ids'
  embeddings) and int64 ``count`` [1] (tokens the mask keeps): a tuple of two outputs, named by the signature.
* ``weighted``: int64 ``ids`` and float32 ``w`` of one shape -> float32 ``score`` [1], ``sum(ids * w) * scale``.
* ``total``: any one input (give its dtype and shape with ``--signature``) -> float32 ``total`` [1], the sum of its
  elements times ``scale`` (1): an exact check that every dtype arrives with its values.
"""

from __future__ import annotations

import torch

from agent_workers.models import register_architecture

CNN_SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [3, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [4]}],
}
TWO_INPUT_SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1]}, {"name": "mask", "dtype": "bool", "shape": [-1]}],
    "outputs": [
        {"name": "pooled", "dtype": "float32", "shape": [4]},
        {"name": "count", "dtype": "int64", "shape": [1]},
    ],
}


class TinyCNN(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(4 * 8 * 8, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.uint8, pixels.dtype
        x = torch.relu(self.conv(pixels.float() / 255.0))
        return self.head(x.flatten(1))


@register_architecture("tiny_cnn", signature=CNN_SIGNATURE)
def build_tiny_cnn(*, classes: int = 4) -> torch.nn.Module:
    return TinyCNN(classes)


class TwoInput(torch.nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert ids.dtype == torch.int64 and mask.dtype == torch.bool, (ids.dtype, mask.dtype)
        keep = mask.unsqueeze(-1).float()
        count = mask.sum(dim=1, keepdim=True)
        return (self.embed(ids) * keep).sum(dim=1) / count.clamp(min=1), count


@register_architecture("two_input", signature=TWO_INPUT_SIGNATURE)
def build_two_input(*, vocab: int = 30522, width: int = 4) -> torch.nn.Module:
    return TwoInput(vocab, width)


class Total(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).float().sum(dim=1, keepdim=True) * self.scale


@register_architecture("total")
def build_total() -> torch.nn.Module:
    return Total()


class Weighted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        assert ids.dtype == torch.int64 and w.dtype == torch.float32, (ids.dtype, w.dtype)
        return (ids.float() * w).sum(dim=1, keepdim=True) * self.scale


@register_architecture("weighted")
def build_weighted() -> torch.nn.Module:
    return Weighted()
