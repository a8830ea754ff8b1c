"""Two example models with plain tensor signatures, and the data they learn (AGENT_WORKERS_PLUGINS=examples.models.zoo).

* ``digits_cnn``: a small convolutional classifier of sklearn's 8×8 digits. Input ``pixels``: uint8 [1, 8, 8]
  (the digits' 0-16 intensities scaled to 0-255); output ``logits``: float32 [10]. ``models create --signature``
  may declare ``pixels`` float32 instead (values in [0, 1]): the module takes either.
* ``order_transformer``: a small transformer encoder classifying variable-length int64 token ids. Input ``ids``:
  int64 [-1] (0 is the padding id); output ``logits``: float32 [2]. Its ``forward`` takes ``attention_mask`` (True
  for real tokens), which agent-workers hands it when it pads a batch of rows of different lengths
  (agent_workers/padding.py).

The transformer's task (:func:`order_data`) is synthetic and depends on token ORDER: every sequence holds exactly
one token ``A`` and one token ``B`` among random filler tokens, and the label is 1 when ``A`` comes before ``B``.
Every sequence holds the same bag of special tokens, so a bag-of-words model is at chance (50 %).

Usage::

    AGENT_WORKERS_PLUGINS=examples.models.zoo agent-workers models create digits --arch digits_cnn
    AGENT_WORKERS_PLUGINS=examples.models.zoo agent-workers worker
"""

from __future__ import annotations

import numpy as np
import torch

from agent_workers.models import register_architecture

DIGITS_SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}
ORDER_SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [2]}],
}
#: The order task's vocabulary: 0 pads, 1 is A, 2 is B, the rest are filler.
PAD, TOKEN_A, TOKEN_B, VOCAB = 0, 1, 2, 16
MIN_LENGTH, MAX_LENGTH = 4, 32


class DigitsCNN(torch.nn.Module):
    """Two 3×3 convolutions, a 2×2 max-pool and a linear head: ~12k parameters."""

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(2 * channels * 4 * 4, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # uint8 pixels are scaled here, so producers send raw bytes (4× fewer than float32 on the wire).
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


@register_architecture("digits_cnn", signature=DIGITS_SIGNATURE)
def build_digits_cnn(*, channels: int = 16, classes: int = 10) -> torch.nn.Module:
    """The digits CNN (``channels``: the first convolution's width; the second has twice as many)."""
    return DigitsCNN(channels, classes)


class OrderTransformer(torch.nn.Module):
    """Token and position embeddings, a pre-norm transformer encoder, a masked mean pool and a linear head."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, max_length: int, classes: int) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width, padding_idx=PAD)
        self.positions = torch.nn.Embedding(max_length, width)
        layer = torch.nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        # No nested tensors: the same dense computation in training and serving (and no warning about norm_first).
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:  # one length in the batch (or padded by the producer with PAD)
            attention_mask = ids != PAD
        mask = attention_mask.bool()
        positions = torch.arange(ids.shape[1], device=ids.device).clamp(max=self.positions.num_embeddings - 1)
        h = self.encoder(self.tokens(ids) + self.positions(positions), src_key_padding_mask=~mask)
        keep = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


@register_architecture("order_transformer", signature=ORDER_SIGNATURE)
def build_order_transformer(
    *, vocab: int = VOCAB, width: int = 32, heads: int = 4, layers: int = 2, max_length: int = 64, classes: int = 2
) -> torch.nn.Module:
    """The order classifier: ``width`` per token, ``layers`` encoder layers of ``heads`` heads."""
    return OrderTransformer(vocab, width, heads, layers, max_length, classes)


def digits_data(*, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's digits as uint8 pixels [n, 1, 8, 8] (0-16 scaled to 0-255) and int64 labels; a stratified 80/20
    split. Returns ``(x_train, x_test, y_train, y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    pixels = np.clip(np.round(x * 255.0 / 16.0), 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, y.astype(np.int64), test_size=0.2, stratify=y, random_state=seed
    )
    return x_train, x_test, y_train, y_test


def order_data(n: int, *, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` token sequences of lengths ``MIN_LENGTH``-``MAX_LENGTH`` and their labels (1: A before B).

    Each sequence is random filler tokens with one A and one B at two random distinct positions; half the labels are
    1. Returns ``(rows, labels)``: a list of int64 arrays and an int64 array.
    """
    rng = np.random.default_rng(seed)
    rows, labels = [], np.empty(n, dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(MIN_LENGTH, MAX_LENGTH + 1))
        row = rng.integers(TOKEN_B + 1, VOCAB, size=length, dtype=np.int64)
        first, second = sorted(rng.choice(length, size=2, replace=False).tolist())
        label = int(rng.integers(0, 2))
        row[first], row[second] = (TOKEN_A, TOKEN_B) if label else (TOKEN_B, TOKEN_A)
        rows.append(row)
        labels[i] = label
    return rows, labels
