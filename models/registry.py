"""The model registry: each architecture's builder, preprocessing and capabilities, once.

Everything that needs to know what a model has (an auxiliary head, its smallest input, its
preprocessing, its published weights) asks ``model_spec``; nothing inspects signatures.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from .errors import UserError
from .inception_v3 import InceptionV3, inception_v3
from .preprocess import INCEPTION_V3, XCEPTION, PreprocessConfig
from .pretrained import INCEPTION_V3_IMAGENET, XCEPTION_IMAGENET, PublishedWeights
from .weights import load_weights
from .xception import Xception, xception


class UnknownArchError(UserError, ValueError):
    """An architecture name that is not registered; the message lists the choices."""


@dataclass(frozen=True)
class ModelSpec:
    """What one architecture is and has.

    Attributes:
        name: canonical name (``-a``).
        builder: ``builder(num_classes, **options)`` returns the model.
        preprocess: crop, resize and normalisation the model expects.
        min_input_size: smallest height/width its forward accepts.
        aux_head: it has an auxiliary classifier (extra training loss, ``aux_logits`` option).
        options: keyword options ``builder`` accepts.
        published: its published ImageNet weights (``--pretrained`` without a file).
        aliases: other names accepted for it (case-insensitive).
    """

    name: str
    builder: Callable[..., nn.Module]
    preprocess: PreprocessConfig
    min_input_size: int
    aux_head: bool
    options: tuple[str, ...]
    published: PublishedWeights
    aliases: tuple[str, ...] = ()


_SPECS = (
    ModelSpec("inception_v3", inception_v3, INCEPTION_V3, InceptionV3.MIN_INPUT_SIZE, aux_head=True,
              options=("aux_logits", "transform_input", "init_weights", "dropout"),
              published=INCEPTION_V3_IMAGENET, aliases=("inceptionv3", "inception-v3")),
    ModelSpec("xception", xception, XCEPTION, Xception.MIN_INPUT_SIZE, aux_head=False,
              options=("dropout",), published=XCEPTION_IMAGENET, aliases=("legacy_xception",)),
)
_REGISTRY = {spec.name: spec for spec in _SPECS}
_ALIASES = {alias: spec.name for spec in _SPECS for alias in (spec.name, *spec.aliases)}


def list_models() -> list[str]:
    """Canonical architecture names, sorted."""
    return sorted(_REGISTRY)


def resolve_arch(name: str) -> str:
    """Canonical name for ``name`` or one of its aliases (case-insensitive)."""
    canonical = _ALIASES.get(str(name).strip().lower())
    if canonical is None:
        raise UnknownArchError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}")
    return canonical


def model_spec(arch: str) -> ModelSpec:
    return _REGISTRY[resolve_arch(arch)]


def preprocess_config(arch: str) -> PreprocessConfig:
    return model_spec(arch).preprocess


def create_model(arch: str, num_classes: int = 1000, weights: str | os.PathLike | Mapping | None = None,
                 **options) -> nn.Module:
    """Build a model, optionally loading weights.

    Args:
        arch: architecture name or alias (see ``list_models``).
        num_classes: classifier outputs. When ``weights`` has another number of classes,
            the classifier heads keep their fresh initialisation (fine-tuning).
        weights: a local weights/checkpoint file or a state dict; see ``models.weights.load_weights``.
        options: architecture options (``model_spec(arch).options``), e.g. ``aux_logits``,
            ``transform_input``, ``dropout`` for inception_v3; ``dropout`` for xception.
    """
    spec = model_spec(arch)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"{spec.name} does not accept option(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(spec.options)}")
    model = spec.builder(num_classes, **options)
    if weights is not None:
        load_weights(model, weights)
    return model
