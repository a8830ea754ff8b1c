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

Both serve raw inputs too (preprocess hooks, docs/hooks.md), and still take their tensors as before:

* ``digits_cnn`` takes ``{"image": {"b64": <PNG/JPEG bytes>}}``: decoded with Pillow, greyscale, resized to 8×8,
  bright ink on a dark background as in the training data (:func:`digits_preprocess`). Labels: :data:`DIGIT_LABELS`.
* ``order_transformer`` takes ``{"text": "the a cat sat on b"}``: split into words by the model's ``tokenizer``
  artifact (:func:`order_tokenizer`, a Hugging Face WordLevel ``tokenizer.json``: ``a`` is A, ``b`` is B, the other
  words are filler). A word outside the vocabulary fails that request with an ``InputError`` naming it, rather
  than being guessed at (:func:`order_preprocess`). Labels: :data:`ORDER_LABELS`.

Usage (README.md "Your own model")::

    AGENT_WORKERS_PLUGINS=examples.models.zoo agent-workers models create digits --arch digits_cnn --config '{}'
    AGENT_WORKERS_PLUGINS=examples.models.zoo agent-workers worker
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agent_workers.errors import InputError
from agent_workers.hooks import raw_bytes, raw_text
from agent_workers.models import register_architecture
from agent_workers.store.artifacts import Artifacts
from agent_workers.tensors import Signature, decode_inputs

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
#: The order task's words, by id: what the tokenizer maps ``a``, ``b`` and the filler words to.
WORDS = ("[PAD]", "a", "b", "the", "cat", "sat", "on", "mat", "dog", "ran", "to", "red", "big", "old", "and", "then")
#: ``top_k`` labels (the ``labels`` artifacts of README.md "Your own model"): index = class.
DIGIT_LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDER_LABELS = ("b-first", "a-first")
#: A tensor sent in place of raw input is checked against the declared signature with this bound (then the worker's).
_TENSOR_BOUND = 1 << 20


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


def digits_preprocess(raw: Any, artifacts: Artifacts) -> np.ndarray:
    """``{"image": {"b64": ...}}`` -> uint8 [1, 8, 8] as the training data holds it; a tensor passes through checked.

    The image is decoded by Pillow, converted to greyscale ("L", 0-255) and resized to 8×8 (box filter: each pixel
    the mean of its area, as sklearn's digits were made by counting ink in 4×4 blocks); its values are used as they
    are, since the training data's 0-16 intensities were scaled to 0-255 (:func:`digits_data`).

    Raises:
        InputError: not an image Pillow can read (the request fails alone), or a bad tensor.
    """
    if not (isinstance(raw, Mapping) and "image" in raw):
        return decode_inputs(_DIGITS, raw, max_elements=_TENSOR_BOUND)  # plain tensors, as before the hook
    from PIL import Image

    with Image.open(io.BytesIO(raw_bytes(raw, "image"))) as image:
        image.draft("L", (8, 8))  # a JPEG decodes straight at a reduced size: far less work for a big photo
        small = image.convert("L").resize((8, 8), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)[None]


def digits_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of one uint8 digit ``[1, 8, 8]`` (or ``[8, 8]``): what a producer would send."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8).reshape(8, 8), mode="L").save(out, format="PNG")
    return out.getvalue()


_DIGITS = Signature.from_json(DIGITS_SIGNATURE)
_ORDER = Signature.from_json(ORDER_SIGNATURE)


@register_architecture("digits_cnn", signature=DIGITS_SIGNATURE, preprocess=digits_preprocess)
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


def order_tokenizer() -> Any:
    """The order task's tokenizer: a Hugging Face WordLevel ``tokenizers.Tokenizer`` over :data:`WORDS`.

    Lower-cases, turns punctuation into spaces and splits on whitespace. Save it with ``.save("tokenizer.json")``
    and store it as the model's ``tokenizer`` artifact; :func:`order_preprocess` reads it back.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    # WordLevel needs an unknown token; "[UNK]" is left out of the vocabulary on purpose, since the model has no id
    # for it: order_preprocess refuses unknown words before encoding.
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def order_preprocess(raw: Any, artifacts: Artifacts) -> np.ndarray:
    """``{"text": "..."}`` -> int64 ids [-1] with the model's ``tokenizer`` artifact; a tensor passes through checked.

    Raises:
        InputError: a word outside the vocabulary (named; the model has no id for it, so guessing one would give a
            silently wrong answer), no words at all, or a bad tensor.
        ModelError: the model has no ``tokenizer`` artifact.
    """
    if not (isinstance(raw, Mapping) and "text" in raw):
        return decode_inputs(_ORDER, raw, max_elements=_TENSOR_BOUND)  # plain token ids, as before the hook
    text = raw_text(raw, "text", max_chars=10_000)
    tokenizer = artifacts.tokenizer()
    words = [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))]
    unknown = sorted({w for w in words if tokenizer.token_to_id(w) is None})
    if unknown:
        raise InputError(f"unknown words {unknown[:10]}: this model knows {list(WORDS[1:])}")
    if not words:
        raise InputError("inputs.text has no words")
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)


def order_text(ids: np.ndarray) -> str:
    """The sentence of token ids ``ids`` (what a producer would send for one of :func:`order_data`'s rows)."""
    return " ".join(WORDS[int(i)] for i in ids)


@register_architecture("order_transformer", signature=ORDER_SIGNATURE, preprocess=order_preprocess)
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
