"""Checkpoint (or bare state dict) -> a model ready for inference, with what it needs.

``load_for_inference`` is what ``demo.py``, ``pthtar2onnx.py`` and evaluation share: it
reads our checkpoints, ModelZoo's (``module.`` prefixes) and bare torchvision/timm state
dicts, checks the architecture and class count with the same checks training uses
(``check_fits``), and returns the eval-mode model with its preprocessing and class names.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .preprocess import PreprocessConfig
from .registry import ModelSpec, UnknownArchError, create_model, list_models, model_spec, resolve_arch
from .weights import WeightsError, extract_state_dict, load_weights, read_weights_file


IMAGENET_CLASSES = 1000
EMA_KEY = "ema_state_dict"  # averaged weights, when the run kept them (--model-ema)


class CheckpointMismatch(UserError):
    """A checkpoint of another architecture or class count than asked for."""


def checkpoint_arch(meta: Mapping) -> str | None:
    """The registry's name for a checkpoint's ``arch`` entry (ModelZoo files use aliases)."""
    name = meta.get("arch")
    if not isinstance(name, str):
        return None
    try:
        return resolve_arch(name)
    except UnknownArchError:
        return name


def check_fits(meta: Mapping, source: str | os.PathLike, arch: str, num_classes: int | None = None) -> None:
    """Refuse a checkpoint of another architecture or class count, naming both."""
    file_arch = checkpoint_arch(meta)
    if file_arch is not None and file_arch != arch:
        raise CheckpointMismatch(f"{source} is a checkpoint of {file_arch}, but -a is {arch}")
    file_classes = meta.get("num_classes")
    if num_classes is not None and file_classes is not None and file_classes != num_classes:
        raise CheckpointMismatch(f"{source} was trained for {file_classes} classes, but this run has {num_classes}")


@dataclass
class InferenceModel:
    """An eval-mode model on the CPU and what its file said about it."""

    model: nn.Module
    spec: ModelSpec
    num_classes: int
    class_names: list[str]
    image_size: int  # the training crop size stored in the checkpoint, else the model's default
    epoch: int | None
    source: Path
    weights: str  # "model", or "ema" for the averaged weights

    @property
    def arch(self) -> str:
        return self.spec.name

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.spec.preprocess


def _classes_from_head(spec: ModelSpec, state: Mapping[str, torch.Tensor], source: Path) -> int:
    # Bare state dicts do not say how many classes they have; the classifier's rows do.
    with torch.device("meta"):  # no memory, no initialisation cost: only the head names are read
        probe = create_model(spec.name)
    for head in probe.classifier_names:
        weight = state.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    raise WeightsError(f"{source} has no classifier weights ({', '.join(probe.classifier_names)}) "
                       f"for {spec.name}; is -a right?")


def imagenet_class_names() -> list[str]:
    from torchvision.models import Inception_V3_Weights  # its metadata is local: no download

    return list(Inception_V3_Weights.IMAGENET1K_V1.meta["categories"])


def resolve_class_names(names: list[str] | None, num_classes: int) -> list[str]:
    """The checkpoint's names, ImageNet's for 1000 classes, else ``class N``."""
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == IMAGENET_CLASSES:
        return imagenet_class_names()
    return [f"class {index}" for index in range(num_classes)]


def _inference_options(spec: ModelSpec, meta: Mapping) -> dict:
    # The aux head only matters for training; its weights, if present, are dropped.
    options = {key: value for key, value in dict(meta.get("model_options") or {}).items() if key in spec.options}
    options.update({key: value for key, value in (("aux_logits", False), ("init_weights", False))
                    if key in spec.options})
    return options


def _arch_of(path: Path, meta: Mapping, arch: str | None) -> str:
    name = arch or meta.get("arch")
    if not name:
        raise CheckpointMismatch(f"{path} does not name its architecture; give it with -a "
                                 f"({', '.join(list_models())})")
    try:
        name = resolve_arch(str(name))
    except UnknownArchError as error:
        raise CheckpointMismatch(f"{path}: {error}") from None
    check_fits(meta, path, name)
    return name


def load_for_inference(path: str | os.PathLike, arch: str | None = None, use_ema: bool = True) -> InferenceModel:
    """Build ``path``'s model for inference: eval mode, CPU, no auxiliary head.

    Args:
        arch: the architecture; needed for bare state dicts, checked against checkpoints.
        use_ema: take the averaged (EMA) weights when the checkpoint has them.
    """
    path = Path(path)
    obj = read_weights_file(path)
    meta = obj if isinstance(obj, Mapping) and ("state_dict" in obj or "model" in obj) else {}
    spec = model_spec(_arch_of(path, meta, arch))
    which = "ema" if use_ema and isinstance(meta.get(EMA_KEY), Mapping) else "model"
    state = extract_state_dict(meta[EMA_KEY] if which == "ema" else obj, str(path))
    num_classes = int(meta.get("num_classes") or _classes_from_head(spec, state, path))
    model = create_model(spec.name, num_classes=num_classes, **_inference_options(spec, meta))
    load_weights(model, state, strict_head=True)
    model.eval()
    image_size = int(meta.get("image_size") or spec.preprocess.input_size)
    epoch = meta.get("epoch")
    return InferenceModel(model, spec, num_classes, resolve_class_names(meta.get("class_names"), num_classes),
                          image_size, int(epoch) if epoch is not None else None, path, which)
