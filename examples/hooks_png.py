"""A classifier of small greyscale images that takes PNG bytes (docs/hooks.md); start workers with
AGENT_WORKERS_PLUGINS=examples.hooks_png."""

import io

import numpy as np
import torch

from agent_workers import register_architecture
from agent_workers.hooks import raw_bytes

SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}


def decode_png(raw, artifacts):
    """{"image": {"b64": PNG bytes}} -> uint8 [1, 8, 8]: greyscale, resized as the model was trained."""
    from PIL import Image

    with Image.open(io.BytesIO(raw_bytes(raw, "image"))) as image:
        return np.array(image.convert("L").resize((8, 8)), dtype=np.uint8)[None]


class PixelClassifier(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.linear = torch.nn.Linear(64, classes)

    def forward(self, pixels):
        return self.linear(pixels.float().flatten(1) / 255.0)


@register_architecture("png_digits", signature=SIGNATURE, preprocess=decode_png)
def build_png_digits(*, classes=10):
    return PixelClassifier(classes)
