"""Variable-length batches: requests of one model whose variable (``-1``) dims differ, padded to the longest member.

A model whose signature has a variable dim takes requests of any length there (contract 1.3, docs/tasks.md
"Variable-length batches"). A batch is padded per input, per dim, to its longest member with the input's ``pad``
value (0 unless the signature says ``"pad": ...``), and the model is told which positions are real the way Hugging
Face models and TEI expect, as an extra keyword argument when its ``forward`` names it (and the signature does not
declare an input of that name):

* ``attention_mask``: int64 ``[batch, longest]``, 1 for a real position, 0 for padding;
* ``lengths``: int64 ``[batch]``, each request's own length.

Both describe the *length dim*: the first variable dim of the first input that has one (``input_ids [-1]``). Outputs
the signature declares with a variable dim are cut back to each request's own sizes (an output's n-th ``-1`` takes
the length input's n-th variable size), so a per-token output answers exactly as many rows as the request sent.

Example (a classifier that masks its padding)::

    class Encoder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):        # input_ids int64 [batch, longest]
            h = self.layers(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
            return self.head((h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from agent_workers.padding import mask_arguments, masks_of, pad_value
from agent_workers.tensors import DTYPES, Signature, TensorSpec

Row = np.ndarray | dict[str, np.ndarray]


def length_input(signature: Signature) -> TensorSpec | None:
    """The input whose first variable dim is the length dim; None for a signature of fixed shapes only."""
    return next((t for t in signature.inputs if -1 in t.shape), None)


def sizes(spec: TensorSpec, row: Row) -> tuple[int, ...]:
    """The variable sizes of ``spec`` in one decoded request, in dim order."""
    array = row[spec.name] if isinstance(row, dict) else row
    return tuple(n for n, d in zip(array.shape, spec.shape, strict=True) if d == -1)


def tokens(spec: TensorSpec, row: Row) -> int:
    """Real tokens of one request: the product of its variable sizes (its length, for one variable dim)."""
    return math.prod(sizes(spec, row))


@dataclasses.dataclass(frozen=True)
class Padded:
    """One padded batch: the stacked inputs, the mask arguments, and each member's variable sizes.

    Attributes:
        batch: an array, or name -> array, of ``len(rows)`` examples padded to the longest.
        extra: the mask keyword arguments the module takes (``attention_mask`` / ``lengths``).
        sizes: per member, the length input's variable sizes (to cut outputs back).
        longest: the padded variable sizes of the length input.
    """

    batch: Row
    extra: dict[str, np.ndarray]
    sizes: list[tuple[int, ...]]
    longest: tuple[int, ...]

    @property
    def real_tokens(self) -> int:
        return sum(math.prod(s) for s in self.sizes)

    @property
    def padded_tokens(self) -> int:
        return len(self.sizes) * math.prod(self.longest)

    def cut(self, signature: Signature, rows: list[Row]) -> list[Row]:
        """Each output row cut back to its request's sizes (outputs the signature declares with ``-1`` only)."""
        cuts = [t for t in signature.outputs if -1 in t.shape]
        if not cuts:
            return rows
        out: list[Row] = []
        for row, own in zip(rows, self.sizes, strict=True):
            if isinstance(row, dict):
                out.append({k: _cut_to(v, _spec(cuts, k), own) for k, v in row.items()})
            else:
                out.append(_cut_to(row, cuts[0], own))
        return out


def pad(signature: Signature, rows: list[Row], *, module: Any = None) -> Padded:
    """Stack ``rows`` (decoded requests of ``signature``), padding every variable dim to the longest member.

    Args:
        module: the model, asked which mask arguments it takes (None: none).
    """
    spec = length_input(signature)
    assert spec is not None, "pad() is for signatures with a variable dim"
    names = [t.name for t in signature.inputs]
    single = len(names) == 1
    batch: dict[str, np.ndarray] = {}
    for entry in signature.inputs:
        parts = [r if single else r[entry.name] for r in rows]  # type: ignore[index]
        batch[entry.name] = _stack_padded(entry, parts)
    own = [sizes(spec, r) for r in rows]
    longest = tuple(max(s[i] for s in own) for i in range(len(own[0])))
    wanted = mask_arguments(module, signature) if module is not None else ()
    masks = masks_of(np.array([s[0] for s in own], dtype=np.int64), longest[0])
    extra = {name: array for name, array in masks.items() if name in wanted}
    return Padded(batch[names[0]] if single else batch, extra, own, longest)


def _stack_padded(spec: TensorSpec, parts: list[np.ndarray]) -> np.ndarray:
    shapes = [p.shape for p in parts]
    if all(s == shapes[0] for s in shapes):
        return np.stack(parts)
    target = tuple(max(s[i] for s in shapes) for i in range(len(spec.shape)))
    out = np.full((len(parts), *target), pad_value(spec), dtype=DTYPES[spec.dtype])
    for i, p in enumerate(parts):
        out[(i, *(slice(0, n) for n in p.shape))] = p
    return out


def _spec(specs: list[TensorSpec], name: str) -> TensorSpec | None:
    return next((t for t in specs if t.name == name), None)


def _cut_to(array: np.ndarray, spec: TensorSpec | None, own: tuple[int, ...]) -> np.ndarray:
    if spec is None or array.ndim != len(spec.shape):
        return array
    index: list[slice] = []
    k = 0
    for d in spec.shape:
        if d == -1 and k < len(own):
            index.append(slice(0, own[k]))
            k += 1
        else:
            index.append(slice(None))
    return array[tuple(index)]
