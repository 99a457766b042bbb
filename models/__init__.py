"""Model registry: ``create_model``, ``list_models``, ``resolve_arch``, ``preprocess_config``.

Each registered architecture carries its builder and its preprocessing config, which data
loading, the demo and export read instead of repeating constants.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from .inception_v3 import InceptionOutputs, InceptionV3, inception_v3
from .preprocess import INCEPTION_V3, XCEPTION, PreprocessConfig
from .weights import WeightsError, load_weights
from .xception import Xception, xception

__all__ = [
    "InceptionOutputs",
    "InceptionV3",
    "PreprocessConfig",
    "WeightsError",
    "Xception",
    "create_model",
    "list_models",
    "load_weights",
    "model_options",
    "preprocess_config",
    "resolve_arch",
]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    preprocess: PreprocessConfig
    aliases: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {
    "inception_v3": _Entry(inception_v3, INCEPTION_V3, ("inceptionv3", "inception-v3")),
    "xception": _Entry(xception, XCEPTION, ("legacy_xception",)),
}
_ALIASES = {alias: name for name, entry in _REGISTRY.items() for alias in (name, *entry.aliases)}


def list_models() -> list[str]:
    """Canonical architecture names, sorted."""
    return sorted(_REGISTRY)


def resolve_arch(name: str) -> str:
    """Canonical name for ``name`` or one of its aliases (case-insensitive)."""
    canonical = _ALIASES.get(name.strip().lower())
    if canonical is None:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}")
    return canonical


def preprocess_config(arch: str) -> PreprocessConfig:
    return _REGISTRY[resolve_arch(arch)].preprocess


def model_options(arch: str) -> dict[str, object]:
    """The keyword options ``create_model`` accepts for ``arch``, with their defaults."""
    params = inspect.signature(_REGISTRY[resolve_arch(arch)].builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_model(
    arch: str,
    num_classes: int = 1000,
    weights: str | os.PathLike | Mapping | None = None,
    **options,
) -> nn.Module:
    """Build a model, optionally loading weights.

    Args:
        arch: architecture name or alias (see ``list_models``).
        num_classes: classifier outputs. When ``weights`` has another number of classes,
            the classifier heads keep their fresh initialisation (fine-tuning).
        weights: a local weights/checkpoint file or a state dict; see ``models.weights.load_weights``.
        options: architecture options, e.g. ``aux_logits``, ``transform_input``, ``dropout``
            for inception_v3; ``dropout`` for xception (see ``model_options``).

    The model gets ``model.arch`` (canonical name) and ``model.preprocess`` (its config).
    """
    name = resolve_arch(arch)
    accepted = model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"{name} does not accept option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    entry = _REGISTRY[name]
    model = entry.builder(num_classes, **options)
    model.arch = name
    model.preprocess = entry.preprocess
    if weights is not None:
        load_weights(model, weights)
    return model
