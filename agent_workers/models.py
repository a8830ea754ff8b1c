"""Model specs and the architecture registry: name -> builder -> ``torch.nn.Module``.

Three architectures are built in: ``linear`` (a linear regression), ``mlp`` (a ReLU classifier of configurable
widths) and ``text_classifier`` (a small transformer encoder over variable-length token ids). Register your own
with :func:`register_architecture`; a worker imports the modules listed in ``AGENT_WORKERS_PLUGINS`` at start-up
so your registration runs there too::

    # my_models.py   (start workers with AGENT_WORKERS_PLUGINS=my_models)
    import torch
    from agent_workers import register_architecture

    @register_architecture("bilinear")
    def build_bilinear(*, in_features: int, out_features: int = 1) -> torch.nn.Module:
        return torch.nn.Bilinear(in_features, in_features, out_features)

The builder takes keyword arguments only (the spec's ``config``) and must be deterministic in its parameter names
and shapes; the weights themselves always come from the parameter store.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_workers import hooks
from agent_workers.errors import ConfigError, ModelError
from agent_workers.tensors import Signature

if TYPE_CHECKING:  # torch is imported where a module is built, so reading specs (the CLI) stays fast
    import torch

Builder = Callable[..., "torch.nn.Module"]
_ARCHITECTURES: dict[str, Builder] = {}
_SIGNATURES: dict[str, Signature] = {}


def register_architecture(
    name: str,
    *,
    signature: Signature | dict[str, Any] | None = None,
    preprocess: hooks.Preprocess | None = None,
    collate: hooks.Collate | None = None,
    postprocess: hooks.Postprocess | None = None,
) -> Callable[[Builder], Builder]:
    """Register ``builder(**config) -> nn.Module`` under ``name``, with its hooks; usable as a decorator.

    Args:
        signature: the architecture's typed inputs and outputs (agent_workers/tensors.py), given to every model of
            it unless ``models create --signature`` overrides it, e.g.
            ``{"inputs": [{"name": "pixels", "dtype": "uint8", "shape": [3, 64, 64]}], "outputs": [...]}``.
        preprocess, collate, postprocess: the hooks of agent_workers/hooks.py (raw inputs to tensors, examples to
            a batch, outputs to answers); None keeps the default.
    """
    declared = None if signature is None else Signature.from_json(signature)

    def decorate(builder: Builder) -> Builder:
        _ARCHITECTURES[name] = builder
        if declared is not None:
            _SIGNATURES[name] = declared
        hooks.register(name, hooks.Hooks(preprocess, collate, postprocess))
        return builder

    return decorate


def load_plugins(modules: Iterable[str]) -> None:
    """Import the modules of ``AGENT_WORKERS_PLUGINS`` so their registrations run here too (idempotent).

    Every entry point that builds or checks a spec calls it: the worker at start-up, and
    :meth:`~agent_workers.store.params.RedisParamStore.from_settings` (the CLI's ``models`` commands, the tools).
    A module of the current directory is found, as ``celery -A`` finds its app: ``python -m`` has the current
    directory on ``sys.path``, a console script such as ``.venv/bin/agent-workers`` does not.

    Raises:
        ConfigError: a module cannot be imported (named, with the import error).
    """
    modules = list(modules)
    if modules and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # last: an installed module of the same name still wins
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"AGENT_WORKERS_PLUGINS names {module!r}, which cannot be imported: {exc}") from exc


def architectures() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_ARCHITECTURES)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model is: its architecture name, the builder's config, its first input's shape per example, and its
    signature (named, typed inputs and outputs; a spec without one takes one float32 input ``x`` of
    ``input_shape``)."""

    arch: str
    config: dict[str, Any]
    input_shape: tuple[int, ...]
    signature: Signature = None  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        if self.signature is None:
            object.__setattr__(self, "signature", Signature.legacy(self.input_shape))

    @functools.cached_property  # read per request: computed once (cached_property writes __dict__, frozen or not)
    def legacy(self) -> bool:
        """True for a spec of one float32 input ``x`` (what every model was before signatures)."""
        return self.signature == Signature.legacy(self.input_shape)

    def to_json(self) -> dict[str, Any]:
        data = {"arch": self.arch, "config": self.config, "input_shape": list(self.input_shape)}
        if not self.legacy:  # old specs are stored as they always were
            data["signature"] = self.signature.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        signature = Signature.from_json(data["signature"]) if data.get("signature") else None
        return cls(
            arch=data["arch"], config=dict(data["config"]), input_shape=tuple(data["input_shape"]), signature=signature
        )

    def build(self) -> torch.nn.Module:
        """Instantiate the architecture (random weights; load the stored ones over them)."""
        try:
            builder = _ARCHITECTURES[self.arch]
        except KeyError:
            raise ModelError(
                f"unknown architecture {self.arch!r}; registered: {', '.join(architectures())} "
                "(register yours and list its module in AGENT_WORKERS_PLUGINS)"
            ) from None
        try:
            return builder(**self.config)
        except TypeError as exc:
            raise ModelError(f"architecture {self.arch!r} rejected config {self.config!r}: {exc}") from exc


def make_spec(arch: str, *, signature: Signature | dict[str, Any] | None = None, **config: Any) -> ModelSpec:
    """Build and check a spec. The signature is ``signature``, else the one the architecture registered, else one
    float32 input of the config's ``input_shape`` or ``(in_features,)``.

    Raises:
        ModelError: an unknown architecture, a config it rejects, a bad signature, or no way to know the input.
    """
    chosen = Signature.from_json(signature) if signature is not None else _SIGNATURES.get(arch)
    input_shape = config.pop("input_shape", None)
    if input_shape is None:
        if chosen is not None:
            input_shape = chosen.inputs[0].shape
        elif "in_features" not in config:
            raise ModelError(f"architecture {arch!r} needs in_features, input_shape or a signature")
        else:
            input_shape = (int(config["in_features"]),)
    spec = ModelSpec(arch=arch, config=config, input_shape=tuple(int(d) for d in input_shape), signature=chosen)
    spec.build()  # fail now, not in a worker
    return spec


@register_architecture("linear")
def build_linear(*, in_features: int, out_features: int = 1) -> torch.nn.Module:
    """A linear regression ``y = x W^T + b``."""
    import torch

    return torch.nn.Linear(in_features, out_features)


@register_architecture("mlp")
def build_mlp(
    *, in_features: int, hidden: list[int] | tuple[int, ...] = (256, 256), out_features: int = 10
) -> torch.nn.Module:
    """A ReLU multi-layer perceptron; ``hidden`` gives the widths of the hidden layers."""
    import torch

    layers: list[torch.nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [torch.nn.Linear(width, int(h)), torch.nn.ReLU()]
        width = int(h)
    layers.append(torch.nn.Linear(width, out_features))
    return torch.nn.Sequential(*layers)


#: The signature of ``text_classifier``: token ids of any length (padded per batch, worker/padding.py) -> logits.
TEXT_SIGNATURE = {
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [2]}],
}


@register_architecture("text_classifier", signature=TEXT_SIGNATURE)
def build_text_classifier(
    *, vocab: int = 1000, width: int = 64, heads: int = 4, layers: int = 2, max_len: int = 512, classes: int = 2
) -> torch.nn.Module:
    """A small transformer encoder classifier over token ids: embeddings, ``layers`` encoder layers, a masked mean
    pool and a linear head. Its ``forward(input_ids, attention_mask=None)`` takes the batch's mask (1 real, 0
    padding), so a padded batch answers each request as it would be answered alone. The ``text`` benchmark's model.
    """
    import torch

    class TextClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.position = torch.nn.Embedding(max_len, width)
            layer = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = torch.nn.Linear(width, classes)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            h = self.embed(input_ids.clamp(0, vocab - 1)) + self.position(positions.clamp(max=max_len - 1))
            h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
            keep = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1.0))

    return TextClassifier()


def parameter_count(module: torch.nn.Module) -> int:
    """Number of scalar parameters in ``module``."""
    return sum(math.prod(p.shape) for p in module.parameters())


def load_weights(spec: ModelSpec, path: str | Path) -> torch.nn.Module:
    """Build ``spec`` and load weights from a safetensors file; anything else is refused, never unpickled.

    Raises:
        ModelError: the file is not safetensors (e.g. a pickle ``.pt`` checkpoint) or does not fit the spec.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    data = Path(path).read_bytes()
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelError(
            f"{path} is not a safetensors file ({exc}); pickle checkpoints (.pt/.pth/.bin) are never loaded. "
            "Convert it where you trust it: safetensors.torch.save_file(torch.load(path), 'model.safetensors')"
        ) from None
    module = spec.build()
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ModelError(f"weights in {path} do not fit architecture {spec.arch!r}: {exc}") from None
    return module
