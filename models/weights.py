"""Reading weight files safely and loading them into our models.

Accepted sources: a bare state dict (torchvision, timm), our checkpoints and ModelZoo's
(``state_dict`` key, ``module.`` prefixes), dicts with a ``model`` key, ``torch.compile``
state dicts (``_orig_mod.``). Files are read with ``weights_only=True``: a pickle that holds
anything but tensors and plain containers is refused, never executed.

A model declares which parameter prefixes form its classifier heads (``classifier_names``)
and which optional parts may be absent (``optional_names``); nothing here depends on the
architecture.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_SHOW_KEYS = 5


class WeightsError(UserError):
    """A weights file or state dict that cannot be used; the message names the file."""


def read_weights_file(path: str | os.PathLike, what: str = "weights file") -> object:
    """``torch.load`` a file on the CPU with ``weights_only=True``, with one-line errors that call
    it ``what`` ("weights file", "checkpoint")."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{what} not found: {path}")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    kind = _file_kind(path, what)
    if kind is None:
        raise WeightsError(f"cannot read {what} {path}: not a PyTorch file (neither the zip archive torch.save "
                           f"writes nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "weights only load failed" in message.lower():
            raise WeightsError(
                f"refusing to load {path}: it contains Python objects other than tensors ({_refusal_reason(message)})"
            ) from None
        raise WeightsError(f"cannot read {what} {path}: {_first_line(message)}") from None
    except Exception as exc:  # zip/pickle/EOF errors from a truncated or foreign file
        if kind == "zip" and "zip archive" in str(exc):
            raise WeightsError(f"cannot read {what} {path}: the zip archive torch.save writes is damaged or "
                               f"incomplete (a copy or a save cut short?)") from None
        raise WeightsError(f"cannot read {what} {path}: {type(exc).__name__}: {_first_line(str(exc))}") from None


def _file_kind(path: Path, what: str) -> str | None:
    """"zip" (torch.save's format since torch 1.6), "pickle" (the legacy one), or None: neither."""
    try:
        with path.open("rb") as stream:
            start = stream.read(4)
    except OSError as exc:
        raise WeightsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if start.startswith(b"PK\x03\x04"):
        return "zip"
    if start[:1] == b"\x80":  # a pickle's PROTO opcode: torch.save writes protocol 2
        return "pickle"
    return None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (Hugging Face's format: tensors only, nothing to execute)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"{path} is a safetensors file: pip install safetensors to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise WeightsError(f"cannot read weights file {path}: {_first_line(str(exc))}") from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _refusal_reason(message: str) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if match:
        return f"unsupported global {match.group(1)}"
    match = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", message)
    return match.group(0) if match else "not a weights-only pickle"


def extract_state_dict(obj: object, source: str = "weights") -> dict[str, torch.Tensor]:
    """The model weights inside ``obj``, without ``module.`` / ``_orig_mod.`` prefixes.

    Args:
        obj: a bare state dict, or a checkpoint dict holding one under ``state_dict`` or ``model``.
        source: how to name ``obj`` in error messages (usually the file path).
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    not_tensors = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors or not obj:
        raise WeightsError(
            f"{source} has no state dict: expected tensors or a 'state_dict'/'model' entry, "
            f"found keys {_show(list(obj))}"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in state:
            raise WeightsError(f"{source} has the key {name!r} twice once prefixes are stripped")
        state[name] = value
    return state


def _show(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW_KEYS else "")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_weights(
    model: nn.Module, source: str | os.PathLike | Mapping, *, strict_head: bool = False
) -> list[str]:
    """Load a weights file or state dict into ``model``; return info messages (also logged).

    Every parameter and buffer must match by name and shape, with these exceptions:

    * classifier heads (``model.classifier_names``) with a different number of classes are
      re-initialised (fine-tuning), unless ``strict_head`` is set;
    * weights for optional parts the model was built without (``model.optional_names``,
      e.g. Inception's ``AuxLogits`` when ``aux_logits=False``) are dropped;
    * missing ``num_batches_tracked`` buffers (files from old PyTorch) keep the model's values.

    Anything else raises ``WeightsError`` naming the source and the offending keys.
    """
    if isinstance(source, Mapping):
        name = "state dict"
        state = extract_state_dict(source, name)
    else:
        name = str(source)
        state = extract_state_dict(read_weights_file(source), name)

    model_state = model.state_dict()
    messages: list[str] = []

    optional = tuple(getattr(model, "optional_names", ()))
    dropped = [k for k in state if k not in model_state and _under(k, optional)]
    for key in dropped:
        del state[key]
    if dropped:
        log.debug("%s: ignored %d keys of parts the model was built without", name, len(dropped))

    heads = tuple(getattr(model, "classifier_names", ()))
    head_keys = [k for k in model_state if _under(k, heads)]
    resized = [k for k in head_keys if k in state and _is_class_count_change(state[k], model_state[k])]
    if resized:
        file_classes = state[resized[0]].shape[0]
        model_classes = model_state[resized[0]].shape[0]
        if strict_head:
            raise WeightsError(
                f"{name}: classifier head has {file_classes} classes, model has {model_classes} "
                f"({_show(resized)})"
            )
        for key in head_keys:
            state.pop(key, None)

    missing = [k for k in model_state if k not in state and not (resized and k in head_keys)]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(model_state[k].shape)}"
        for k in state
        if k in model_state and state[k].shape != model_state[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_show(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_show(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (file vs model): {_show(mismatched)}")
    if problems:
        arch = getattr(model, "arch", type(model).__name__)
        raise WeightsError(f"{name} does not fit {arch}: " + "; ".join(problems))

    model.load_state_dict(state, strict=False)
    if resized:
        _init_heads(model, heads)
        messages.append(
            f"classifier head re-initialised: file has {file_classes} classes, "
            f"model has {model_classes} (fine-tuning)"
        )
    messages.insert(0, f"loaded weights from {name}")
    for message in messages:
        log.info(message)
    return messages


def _is_class_count_change(file_tensor: torch.Tensor, model_tensor: torch.Tensor) -> bool:
    # Only the output dimension may differ; a different input width is a real mismatch.
    return (
        file_tensor.dim() == model_tensor.dim()
        and file_tensor.shape[0] != model_tensor.shape[0]
        and file_tensor.shape[1:] == model_tensor.shape[1:]
    )


def _init_heads(model: nn.Module, heads: tuple[str, ...]) -> None:
    init = getattr(model, "init_classifier", None)
    if init is not None:
        init()
        return
    for head in heads:
        module = model.get_submodule(head)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
