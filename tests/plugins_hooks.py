"""Test plugin of architectures with hooks (``AGENT_WORKERS_PLUGINS=tests.plugins_hooks``), contract 1.3.

* ``png_classifier``: raw ``{"image": {"b64": <PNG bytes>}}`` -> (preprocess: Pillow, greyscale, 8×8) uint8
  ``pixels`` [1, 8, 8] -> float32 ``logits`` [3]; answers with the built-in outputs (top_k with its labels).
* ``text_embedder``: raw ``{"text": "..."}`` -> (preprocess: the model's ``tokenizer`` artifact) int64 ``ids`` [-1]
  -> float32 ``embedding`` [4] (the sum of the ids' embeddings; id 0 is padding and embeds to zeros) and int64
  ``length`` [1]. Its ``collate`` pads the ids of a batch to the longest with 0, so sentences of any lengths share
  one forward pass and every answer equals the unpadded one exactly.
* ``png_argmax``: ``png_classifier`` with a ``postprocess`` hook: ``{"label": best label, "margin": ...}``, reading a
  request option of its own (``margin``: also the gap between the two best logits).
* ``held_text``: ``text_embedder`` whose preprocess first waits (up to 60 s) until the test pushes to the Redis list
  named by the text (``hold:<key>``): a request being "decoded" for as long as the test wants.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import redis
import torch

from agent_workers.config import Settings
from agent_workers.hooks import raw_bytes, raw_text
from agent_workers.models import register_architecture
from agent_workers.store.artifacts import Artifacts

PNG_SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [3]}],
}
TEXT_SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1]}],
    "outputs": [
        {"name": "embedding", "dtype": "float32", "shape": [4]},
        {"name": "length", "dtype": "int64", "shape": [1]},
    ],
}


def decode_png(raw: Any, artifacts: Artifacts) -> np.ndarray:
    """PNG bytes -> uint8 [1, 8, 8]: greyscale, resized to 8×8 (what the model was trained on)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw_bytes(raw, "image"))) as image:
        return np.array(image.convert("L").resize((8, 8)), dtype=np.uint8)[None]


def tokenize(raw: Any, artifacts: Artifacts) -> np.ndarray:
    """Text -> int64 ids by the model's own tokenizer (stored with it as the ``tokenizer`` artifact)."""
    return np.asarray(artifacts.tokenizer().encode(raw_text(raw, "text")).ids, dtype=np.int64)


def pad(examples: list[np.ndarray]) -> np.ndarray:
    """Ids of any lengths as one batch, padded with 0 (which embeds to zeros)."""
    batch = np.zeros((len(examples), max(len(e) for e in examples)), dtype=np.int64)
    for i, e in enumerate(examples):
        batch[i, : len(e)] = e
    return batch


def best_label(outputs: list[np.ndarray], artifacts: Artifacts, options: list[Any]) -> list[dict[str, Any]]:
    labels = artifacts.labels or []
    answers = []
    for logits, opts in zip(outputs, options, strict=True):
        order = np.argsort(-logits)
        answer: dict[str, Any] = {"label": labels[int(order[0])]}
        if opts is not None and opts.extra.get("margin"):
            answer["margin"] = float(logits[order[0]] - logits[order[1]])
        answers.append(answer)
    return answers


def held_tokenize(raw: Any, artifacts: Artifacts) -> np.ndarray:
    text = raw_text(raw, "text")
    if text.startswith("hold:"):
        redis.Redis.from_url(Settings.from_env().params_url, socket_timeout=90).blpop([text], timeout=60)
    return tokenize({"text": "hello"}, artifacts)


class Linear8(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(64, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.uint8, pixels.dtype
        return self.head(pixels.float().flatten(1) / 255.0)


class SumEmbedding(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 4, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(ids).sum(dim=1), (ids != 0).sum(dim=1, keepdim=True)


@register_architecture("png_classifier", signature=PNG_SIGNATURE, preprocess=decode_png)
def build_png_classifier(*, classes: int = 3) -> torch.nn.Module:
    return Linear8(classes)


@register_architecture("png_argmax", signature=PNG_SIGNATURE, preprocess=decode_png, postprocess=best_label)
def build_png_argmax(*, classes: int = 3) -> torch.nn.Module:
    return Linear8(classes)


@register_architecture("text_embedder", signature=TEXT_SIGNATURE, preprocess=tokenize, collate=pad)
def build_text_embedder(*, vocab: int = 16) -> torch.nn.Module:
    return SumEmbedding(vocab)


@register_architecture("held_text", signature=TEXT_SIGNATURE, preprocess=held_tokenize, collate=pad)
def build_held_text(*, vocab: int = 16) -> torch.nn.Module:
    return SumEmbedding(vocab)
