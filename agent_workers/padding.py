"""Padding a batch of variable-length examples, and how the mask reaches the model.

One convention for every path that batches rows of different lengths (training here; inference's variable-length
batching, issue 19 item 3, is meant to share it):

* every variable dimension (``-1`` in the signature) of every input is padded with zeros at its end to the
  longest member of the batch (a ``bool`` input pads with ``False``, so a mask the producer sends stays a mask);
* the **attention mask** is a ``bool`` array [batch, longest] that is True where the first variable dimension of
  the first variable-length input holds a real element;
* the model gets it as the keyword argument ``attention_mask`` when its ``forward`` takes a parameter of that
  name (or ``**kwargs``) and its signature does not name an input ``attention_mask`` itself; a model that does not
  take it gets its inputs alone (it must then treat the padding value 0 itself).

numpy only: torch is imported where the module is called (:func:`call_module`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent_workers.tensors import Signature

#: The keyword a padded batch's mask is handed to the model under.
MASK = "attention_mask"

#: A batch as the model takes it: one array (one input), or name -> array (several inputs, or a mask beside them).
Batch = np.ndarray | dict[str, np.ndarray]


def pad_rows(rows: Sequence[np.ndarray], dtype: np.dtype[Any] | None = None) -> np.ndarray:
    """Stack ``rows`` of equal rank, each padded with zeros at the end of every dimension to the batch's largest.

    Args:
        rows: one array per example (at least one), all of the same rank.
        dtype: the batch's dtype (default: the first row's).

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
    batch = np.zeros((len(rows), *largest), dtype=dtype or rows[0].dtype)
    for i, row in enumerate(rows):
        batch[(i, *(slice(0, s) for s in row.shape))] = row
    return batch


def mask_of(lengths: np.ndarray, longest: int) -> np.ndarray:
    """The attention mask of rows of ``lengths`` padded to ``longest``: bool [n, longest], True on real elements."""
    return np.arange(longest)[None, :] < np.asarray(lengths)[:, None]


def takes_mask(module: Any, signature: Signature) -> bool:
    """Whether ``module.forward`` takes ``attention_mask`` and the signature leaves it to us (see the module doc)."""
    if any(t.name == MASK for t in signature.inputs):
        return False
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a compiled or C-implemented forward: no mask rather than a guess
        return False
    return MASK in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_module(module: Any, signature: Signature, batch: Batch) -> Any:
    """Call ``module`` on ``batch``: ``module(x)`` for one input, ``module(**inputs)`` for several, each as a torch
    tensor in its signature's dtype (bfloat16 from its raw bits), plus ``attention_mask=`` when the batch carries a
    mask and the module takes one. A legacy float32 batch (one array) is ``module(x)`` exactly as before.

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
    extra = {}
    if MASK in batch and MASK not in tensors and takes_mask(module, signature):
        extra[MASK] = torch.from_numpy(np.ascontiguousarray(batch[MASK]))
    if len(tensors) == 1:
        return module(*tensors.values(), **extra)
    return module(**tensors, **extra)
