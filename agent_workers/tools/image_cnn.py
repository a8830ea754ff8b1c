"""The small CNNs of the benchmark's ``image`` workload, registered in a worker started with
``AGENT_WORKERS_PLUGINS=agent_workers.tools.image_cnn`` (and wherever the benchmark builds them to time them alone).

Both take uint8 ``pixels`` [3, 64, 64] to float32 ``logits`` [10]: pixels scaled to [0, 1], 3×3 convolutions (the
first two strided), global average pooling and a linear head.

* ``bench_cnn_wide``: 32, 64 and 64 channels, 56,970 parameters, about 0.3–0.5 ms of CPU per image at batch 64 on
  one thread: the scale of the CNN issue 19 measured (0.35–0.53 ms), against which its goal "worker CPU per image
  ≤ 2× the forward pass" was set.
* ``bench_cnn``: 16 and 32 channels, 5,418 parameters, under 0.1 ms per image: so small that the cost of getting
  each image to it (message, decoding, result) is nearly all the worker spends.
"""

from __future__ import annotations

import torch

from agent_workers.models import register_architecture

SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [3, 64, 64]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}
ARCHITECTURE = "bench_cnn"
WIDE_ARCHITECTURE = "bench_cnn_wide"


class BenchCNN(torch.nn.Module):
    """3×3 convolutions of ``channels`` (the first two with stride 2), ReLU after each, mean-pooled, linear head."""

    def __init__(self, classes: int, channels: tuple[int, ...] = (16, 32)) -> None:
        super().__init__()
        widths = (3, *channels)
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(a, b, kernel_size=3, stride=2 if i < 2 else 1, padding=1)
            for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False))
        )
        self.head = torch.nn.Linear(channels[-1], classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255.0
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


@register_architecture(ARCHITECTURE, signature=SIGNATURE)
def build_bench_cnn(*, classes: int = 10) -> torch.nn.Module:
    return BenchCNN(classes)


@register_architecture(WIDE_ARCHITECTURE, signature=SIGNATURE)
def build_bench_cnn_wide(*, classes: int = 10) -> torch.nn.Module:
    return BenchCNN(classes, channels=(32, 64, 64))
