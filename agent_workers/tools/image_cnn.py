"""The small CNN of the benchmark's ``image`` workload, registered in a worker started with
``AGENT_WORKERS_PLUGINS=agent_workers.tools.image_cnn`` (and wherever the benchmark builds it to time it alone).

``bench_cnn``: uint8 ``pixels`` [3, 64, 64] -> float32 ``logits`` [10]: pixels scaled to [0, 1], two strided 3×3
convolutions (16 and 32 channels), global average pooling and a linear head, 5,418 parameters. Its forward pass at
batch 64 takes a fraction of a millisecond per image on one CPU thread, so the cost of getting each image to it
(message size, decoding) is what the workload measures.
"""

from __future__ import annotations

import torch

from agent_workers.models import register_architecture

SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [3, 64, 64]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}
ARCHITECTURE = "bench_cnn"


class BenchCNN(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.head = torch.nn.Linear(32, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(pixels.float() / 255.0))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


@register_architecture(ARCHITECTURE, signature=SIGNATURE)
def build_bench_cnn(*, classes: int = 10) -> torch.nn.Module:
    return BenchCNN(classes)
