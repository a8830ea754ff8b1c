"""Padding a batch of variable-length examples, and how the mask reaches the model.

One convention for every path that batches rows of different lengths (training here; it matches inference's
variable-length batching, worker/padding.py, which takes its mask arguments and pad values from here, so a model
trains and serves alike):

* every variable dimension (``-1`` in the signature) of every input is padded at its end to the longest member of
  the batch with the input's ``pad`` (0 unless its signature entry declares one; a ``bool`` input pads with
  ``False``, so a mask the producer sends stays a mask);
* the *length dim* is the first variable dimension of the first input that has one (``ids [-1]``);
* the model is told which positions are real as extra keyword arguments, each only when its ``forward`` names it
  and its signature does not declare an input of that name: ``attention_mask``, int64 [batch, longest], 1 for a real
  position and 0 for padding (as Hugging Face models and TEI take it), and ``lengths``, int64 [batch], each row's
  own length. A model that names neither gets its inputs alone (it must then treat the padding value 0 itself).

numpy only: torch is imported where the module is called (:func:`call_module`)."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent_workers.tensors import Signature, TensorSpec

#: The keywords a padded batch's mask is handed to the model under.
MASK, LENGTHS = "attention_mask", "lengths"
MASK_ARGUMENTS = (MASK, LENGTHS)

_wants: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()

#: A batch as the model takes it: one array (one input), or name -> array (several inputs, or a mask beside them).
Batch = np.ndarray | dict[str, np.ndarray]


def pad_rows(rows: Sequence[np.ndarray], dtype: np.dtype[Any] | None = None, value: Any = 0) -> np.ndarray:
    """Stack ``rows`` of equal rank, each padded with ``value`` at the end of every dimension to the batch's largest.

    Args:
        rows: one array per example (at least one), all of the same rank.
        dtype: the batch's dtype (default: the first row's).
        value: the padding (:func:`pad_value` of the input's spec).

    Returns:
        The padded batch [n, *largest].

    Raises:
        ValueError: no rows, or rows of different ranks.
    """
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    ranks = {r.ndim for r in rows}
    if len(ranks) != 1:
        raise ValueError(f"rows of one batch must have one rank, got ranks {sorted(ranks)}")
    largest = tuple(max(r.shape[d] for r in rows) for d in range(rows[0].ndim))
    batch = np.full((len(rows), *largest), value, dtype=dtype or rows[0].dtype)
    for i, row in enumerate(rows):
        batch[(i, *(slice(0, s) for s in row.shape))] = row
    return batch


def masks_of(lengths: np.ndarray, longest: int) -> dict[str, np.ndarray]:
    """The mask arguments of rows of ``lengths`` padded to ``longest``: ``attention_mask`` int64 [n, longest] (1 on
    real positions) and ``lengths`` int64 [n]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return {MASK: (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64), LENGTHS: lengths}


def mask_arguments(module: Any, signature: Signature) -> tuple[str, ...]:
    """Which of :data:`MASK_ARGUMENTS` ``module.forward`` names and the signature does not declare (cached per
    module: inference asks per batch, a training walk per step)."""
    target = getattr(module, "_orig_mod", module)  # torch.compile wraps the module; ask the original
    try:
        return _wants[target]
    except (KeyError, TypeError):  # TypeError: a module that cannot be weakly referenced is asked every time
        pass
    try:
        params = inspect.signature(target.forward).parameters
    except (TypeError, ValueError):  # a C-implemented forward: no mask rather than a guess
        params = {}  # type: ignore[assignment]
    declared = {t.name for t in signature.inputs}
    found = tuple(a for a in MASK_ARGUMENTS if a in params and a not in declared)
    try:
        _wants[target] = found
    except TypeError:
        pass
    return found


def pad_value(spec: TensorSpec) -> Any:
    """What a variable dim of ``spec`` is padded with: its signature's ``pad`` (0 unless declared), as the numpy
    value of its dtype (bfloat16, held as raw bits: the upper 16 bits of the float32)."""
    if spec.dtype == "bfloat16":
        return int(np.array(spec.pad, dtype="<f4").view("<u4") >> 16)
    return spec.pad


def call_module(module: Any, signature: Signature, batch: Batch) -> Any:
    """Call ``module`` on ``batch``: ``module(x)`` for one input, ``module(**inputs)`` for several, each as a torch
    tensor in its signature's dtype (bfloat16 from its raw bits), plus the mask arguments the batch carries and the
    module names (``attention_mask=``, ``lengths=``). A legacy float32 batch (one array) is ``module(x)`` as before.

    Returns:
        Whatever the module returns.
    """
    import torch

    if not isinstance(batch, dict):
        return module(torch.from_numpy(np.ascontiguousarray(batch)))
    tensors = {}
    for spec in signature.inputs:
        x = torch.from_numpy(np.ascontiguousarray(batch[spec.name]))
        tensors[spec.name] = x.view(torch.bfloat16) if spec.dtype == "bfloat16" else x
    extra = {
        a: torch.from_numpy(np.ascontiguousarray(batch[a])) for a in mask_arguments(module, signature) if a in batch
    }
    if len(tensors) == 1:
        return module(*tensors.values(), **extra)
    return module(**tensors, **extra)
