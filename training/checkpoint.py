"""Checkpoint files: the one schema, its checks, atomic writes, and finding the right file.

``Checkpoint`` is what a checkpoint holds (docs/OUTPUTS.md). Its ``to_dict`` and
``from_dict`` are the only code that spells the file's keys; ``from_dict`` checks the type
and range of every field and that the weights are finite, so that training, evaluation,
the demo and the export never act on a damaged file: each gets a ``CheckpointError``
naming the file and the field (or the first bad tensor). It reads our files (format 1 and
2), ModelZoo's (``module.`` prefixes, a tensor ``best_acc1``) and bare state dicts. The
optimizer and loss-scaler states are opaque here: their owners restore them.

``inference_weights`` is the one decision between the raw and the averaged (EMA) weights.
Files are read with ``weights_only=True`` (tensors and plain values only) and written
atomically (``training.atomic``).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from models.errors import UserError
from models.registry import UnknownArchError, resolve_arch
from models.weights import WeightsError, extract_state_dict, read_weights_file
from training.atomic import replace_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
LAST_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
MAX_IMAGE_SIZE = 2048  # beyond this a saved image size is damage, not a setting: demo would allocate without bound
MAX_CLASSES = 1_000_000
WEIGHT_KINDS = ("model", "ema")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint of another architecture or class count than asked for."""


# -- checking one field ------------------------------------------------------------------------

def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """Reads the fields of one checkpoint dict, each checked; errors name the file and the key."""

    def __init__(self, obj: Mapping, source: str):
        self.obj, self.source = obj, source

    def fail(self, key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: '{key}' is {_shown(self.obj.get(key))}, expected {expected}; "
                               f"the file is damaged or was not written by this code")

    def whole(self, key: str, low: int, high: int | None = None, default: Any = None) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            expected = f"a whole number from {low}" + (f" to {high}" if high is not None else "")
            raise self.fail(key, expected)
        return value

    def number(self, key: str, low: float, high: float) -> float | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()  # ModelZoo saves best_acc1 as a tensor
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.fail(key, f"a number from {low:g} to {high:g}")
        return float(value)

    def text(self, key: str, choices: Iterable[str] | None = None) -> str | None:
        value = self.obj.get(key)
        if value is None:
            return None
        choices = tuple(choices) if choices is not None else None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.fail(key, f"one of {', '.join(choices)}" if choices else "a name")
        return value

    def mapping(self, key: str) -> dict | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping) or not all(isinstance(name, str) for name in value):
            raise self.fail(key, "a dict with string keys")
        return dict(value)

    def names(self, key: str) -> list[str] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
            raise self.fail(key, "a list of names")
        return list(value)

    def scalars(self, key: str) -> dict[str, Any]:
        value = self.mapping(key) or {}
        if not all(item is None or isinstance(item, (bool, int, float, str)) for item in value.values()):
            raise self.fail(key, "a dict of plain values")
        return value

    def weights(self, key: str, what: str) -> dict[str, torch.Tensor] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        try:
            weights = extract_state_dict(value, f"{self.source} ({what})")
        except WeightsError as error:
            raise CheckpointError(str(error)) from None
        bad = first_nonfinite(weights)
        if bad is not None:
            raise CheckpointError(f"{self.source}: the {what} are damaged: {bad} holds NaN or infinite values "
                                  f"(a diverged run, or a corrupted file); use another checkpoint")
        return weights


def first_nonfinite(weights: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None.

    One host read for all tensors when they are finite (a device sync on an accelerator);
    the search tensor by tensor only when one is not.
    """
    floating = [(name, tensor) for name, tensor in weights.items() if tensor.is_floating_point() or tensor.is_complex()]
    if not floating or bool(torch.stack([torch.isfinite(tensor).all() for _, tensor in floating]).all()):
        return None
    return next(name for name, tensor in floating if not bool(torch.isfinite(tensor).all()))


def _epoch_sums(fields: _Fields) -> dict[str, Any] | None:
    sums = fields.mapping("epoch_sums")
    if sums is None:
        return None
    hits, count, loss_sum = sums.get("hits"), sums.get("count"), sums.get("loss_sum")
    valid = (isinstance(hits, (list, tuple)) and len(hits) == 2
             and all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hits)
             and isinstance(count, int) and not isinstance(count, bool) and count >= 0
             and isinstance(loss_sum, (int, float)) and not isinstance(loss_sum, bool) and math.isfinite(loss_sum))
    if not valid:
        raise fields.fail("epoch_sums", "the running sums of a partial epoch (loss_sum, hits, count)")
    return {"loss_sum": float(loss_sum), "hits": list(hits), "count": count}


# -- the schema -------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """What a checkpoint holds; None where the file does not say (ModelZoo files, bare weights).

    Attributes:
        weights: the model's state dict, without ``module.`` prefixes.
        epoch: completed epochs; training continues with epoch ``epoch``.
        step: steps of epoch ``epoch`` already done (a mid-epoch checkpoint), else 0.
        best_weights: which weights reached ``best_acc1``: "model" (raw) or "ema" (averaged).
        options: the options of the run that wrote it (``args`` in the file).
        is_training_state: the file is a training checkpoint (a ``state_dict`` entry), not bare weights.
    """

    weights: dict[str, torch.Tensor]
    arch: str | None = None
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int | None = None
    epoch_sums: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    best_acc1: float | None = None
    best_weights: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    image_size: int | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    layout: dict[str, Any] | None = None
    ema_weights: dict[str, torch.Tensor] | None = None
    ema_updates: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    is_training_state: bool = True
    source: str = field(default="the checkpoint", compare=False, repr=False)  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        """The dict written to disk (format ``FORMAT_VERSION``)."""
        saved = {"format_version": FORMAT_VERSION, "arch": self.arch, "epoch": self.epoch, "step": self.step,
                 "steps_per_epoch": self.steps_per_epoch, "state_dict": self.weights, "optimizer": self.optimizer,
                 "scaler": self.scaler, "best_acc1": self.best_acc1, "num_classes": self.num_classes,
                 "class_names": self.class_names, "image_size": self.image_size,
                 "model_options": dict(self.model_options), "seed": self.seed, "layout": self.layout,
                 "epoch_sums": self.epoch_sums, "best_weights": self.best_weights or "model"}
        if self.ema_weights is not None:
            saved.update({"ema_state_dict": self.ema_weights, "ema_updates": self.ema_updates or 0})
        saved["args"] = self.options
        return saved

    @classmethod
    def from_dict(cls, obj: Any, source: str | os.PathLike) -> "Checkpoint":
        """Check and read ``obj`` (a loaded file; ``source`` names it in errors)."""
        source = str(source)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a checkpoint or a state dict")
        if "state_dict" not in obj and "model" not in obj:
            weights = _Fields({"weights": obj}, source).weights("weights", "weights")
            return cls(weights=weights, format_version=0, is_training_state=False, source=source)
        fields = _Fields(obj, source)
        version = fields.whole("format_version", 0, default=0)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{source} has format version {version}, newer than this code reads "
                                  f"({FORMAT_VERSION}): update the code")
        key = "state_dict" if "state_dict" in obj else "model"
        checkpoint = cls(
            weights=fields.weights(key, "weights"), arch=fields.text("arch"), epoch=fields.whole("epoch", 0, default=0),
            step=fields.whole("step", 0, default=0), steps_per_epoch=fields.whole("steps_per_epoch", 1),
            epoch_sums=_epoch_sums(fields), optimizer=fields.mapping("optimizer"), scaler=fields.mapping("scaler"),
            best_acc1=fields.number("best_acc1", 0.0, 100.0), best_weights=fields.text("best_weights", WEIGHT_KINDS),
            num_classes=fields.whole("num_classes", 1, MAX_CLASSES), class_names=fields.names("class_names"),
            image_size=fields.whole("image_size", 1, MAX_IMAGE_SIZE), model_options=fields.scalars("model_options"),
            seed=fields.whole("seed", -2**63), layout=fields.mapping("layout"),
            ema_weights=fields.weights("ema_state_dict", "averaged (EMA) weights"),
            ema_updates=fields.whole("ema_updates", 0), options=fields.mapping("args") or {},
            format_version=version, is_training_state=key == "state_dict", source=source)
        checkpoint._check_consistency(fields)
        return checkpoint

    def _check_consistency(self, fields: _Fields) -> None:
        if self.steps_per_epoch is not None and self.step > self.steps_per_epoch:
            raise fields.fail("step", f"at most steps_per_epoch ({self.steps_per_epoch})")
        if self.step and self.steps_per_epoch is None:
            raise fields.fail("step", "0 in a file without steps_per_epoch")
        # --num-classes may make the head larger than the data set's class folders, never smaller.
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) > self.num_classes:
            raise fields.fail("class_names", f"at most {self.num_classes} names (num_classes)")

    # -- what the file says about the model ----------------------------------------------------

    def registered_arch(self) -> str | None:
        """The registry's name for ``arch`` (ModelZoo files use aliases); an unknown name as is."""
        if self.arch is None:
            return None
        try:
            return resolve_arch(self.arch)
        except UnknownArchError:
            return self.arch

    def check_fits(self, source: str | os.PathLike, arch: str, num_classes: int | None = None) -> None:
        """Refuse a checkpoint of another architecture or class count, naming both."""
        file_arch = self.registered_arch()
        if file_arch is not None and file_arch != arch:
            raise CheckpointMismatch(f"{source} is a checkpoint of {file_arch}, but -a is {arch}")
        if num_classes is not None and self.num_classes is not None and self.num_classes != num_classes:
            raise CheckpointMismatch(f"{source} was trained for {self.num_classes} classes, but this run has "
                                     f"{num_classes}")

    def model_options_for(self, accepted: Iterable[str]) -> dict[str, Any]:
        """``model_options``, refused when the architecture has no such option."""
        unknown = sorted(set(self.model_options) - set(accepted))
        if unknown:
            raise CheckpointError(f"{self.source}: model option(s) {', '.join(unknown)} that this architecture does not "
                                  f"have (accepted: {', '.join(accepted)})")
        return dict(self.model_options)

    def check_options(self, expected: Mapping[str, Any], names: Iterable[str]) -> None:
        """The saved options among ``names`` have the kinds of value ``expected`` holds for them
        (this code's own values; a None on either side says nothing): a resumed run takes them."""
        for name in names:
            value, like = self.options.get(name), expected.get(name)
            if value is not None and like is not None and not _same_kind(value, like):
                raise CheckpointError(f"{self.source}: its option {name} is {_shown(value)}, expected "
                                      f"{_kind(like)}; the file is damaged or was not written by this code")

    def inference_weights(self, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
        """The weights to evaluate, demo or export, and which they are ("model" or "ema").

        The averaged (EMA) weights when the file holds them, unless ``use_ema`` is off
        (``--no-ema``) or the file records that its raw weights scored better
        (``best_weights``: model_best.pth.tar records which of its weights were the best).
        """
        scored_better = self.best_weights if self.best_acc1 is not None else None
        if use_ema and self.ema_weights is not None and scored_better != "model":
            return self.ema_weights, "ema"
        return self.weights, "model"

    def position(self) -> str:
        return f"epoch {self.epoch}" + (f", step {self.step} of {self.steps_per_epoch}" if self.step else "")


def _same_kind(value: Any, like: Any) -> bool:
    """Whether ``value`` is of the kind ``like`` shows: a bool, an int, a number, a text, one of a
    frozenset's choices, or a list of such."""
    if isinstance(like, frozenset):
        return value in like
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if isinstance(like, int):
        return isinstance(value, int)
    if isinstance(like, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(like, (list, tuple)):
        return (isinstance(value, (list, tuple)) and len(value) == len(like)
                and all(_same_kind(item, model) for item, model in zip(value, like)))
    return isinstance(value, type(like))


def _kind(like: Any) -> str:
    if isinstance(like, (list, tuple)):
        return f"a list of {len(like)} values"
    if isinstance(like, frozenset):
        return "one of " + ", ".join(sorted(map(str, like)))
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}.get(type(like), "a value")


# -- files -------------------------------------------------------------------------------------

def save_checkpoint(checkpoint: Checkpoint | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (a dict is checked against the schema first).

    Raises:
        WriteError: the file could not be written (full disk...); the previous file is intact.
    """
    path = Path(path)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.from_dict(checkpoint, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = checkpoint.to_dict()
    return replace_file(path, lambda stream: torch.save(payload, stream))


def _read_file(path: Path) -> Any:
    try:
        return read_weights_file(path, what="checkpoint")
    except WeightsError as error:
        raise CheckpointError(str(error)) from None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A training checkpoint (ours or ModelZoo's), checked; ``CheckpointError`` names the file."""
    path = Path(path)
    checkpoint = Checkpoint.from_dict(_read_file(path), path)
    if not checkpoint.is_training_state:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' entry); "
                              f"use it with --pretrained")
    return checkpoint


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checked training checkpoint as the dict of its file's keys (for tools and tests)."""
    return read_checkpoint(path).to_dict()


# -- finding the right file ----------------------------------------------------------------------

def find_resume_checkpoint(folder: str | os.PathLike) -> tuple[Path, Checkpoint] | None:
    """For ``--resume auto``: ``checkpoint.pth.tar`` in ``folder``, else ``model_best.pth.tar``
    (announced: it may be older than the last), else None when the folder has neither.

    An unreadable or damaged ``checkpoint.pth.tar`` is an error, never a reason to start
    over or to fall back to an older file silently.
    """
    folder = Path(folder)
    last, best = folder / LAST_NAME, folder / BEST_NAME
    if last.exists():
        try:
            return last, read_checkpoint(last)
        except CheckpointError as error:
            hint = f"; to continue from {best} instead, give --resume {best}" if best.is_file() else ""
            raise CheckpointError(f"--resume auto: {error}{hint}") from None
    if best.exists():
        checkpoint = read_checkpoint(best)
        log.warning("warning: --resume auto: %s has no %s; resuming from %s (%s), which may be older than the "
                    "last epoch trained", folder, LAST_NAME, best, checkpoint.position())
        return best, checkpoint
    return None


def default_search_roots(repo_dir: Path) -> list[Path]:
    """Where main.py and the test/ scripts write by default: ``./output``, ``<repo>/output``,
    ``<repo>/test/output`` and ``$TEST_OUTPUT_DIR``."""
    roots = [Path("output"), repo_dir / "output", repo_dir / "test" / "output"]
    if os.environ.get("TEST_OUTPUT_DIR"):
        roots.append(Path(os.environ["TEST_OUTPUT_DIR"]))
    return roots


def _first_usable(candidates: Iterable[Path]) -> Path | None:
    for candidate in candidates:
        try:
            read_checkpoint(candidate)
        except CheckpointError as error:
            log.warning("warning: skipped %s", error)
            continue
        return candidate
    return None


def find_newest_run_checkpoint(roots: Iterable[str | os.PathLike]) -> Path | None:
    """The checkpoint to use after training, for the demo and the export.

    Among the run folders below ``roots`` (a folder holding ``checkpoint.pth.tar`` or
    ``model_best.pth.tar``), the one written last; in it, its best model if usable, else
    its last checkpoint. A file skipped as unusable is named in a warning.
    """
    runs: dict[Path, float] = {}
    for root in {Path(root).resolve() for root in roots if Path(root).is_dir()}:
        for name in (LAST_NAME, BEST_NAME):
            for found in root.rglob(name):
                runs[found.parent] = max(runs.get(found.parent, 0.0), found.stat().st_mtime)
    for run in sorted(runs, key=runs.__getitem__, reverse=True):
        chosen = _first_usable(run / name for name in (BEST_NAME, LAST_NAME) if (run / name).is_file())
        if chosen is not None:
            return chosen
    return None


def checkpoint_for_inference(given: str | os.PathLike | None, repo_dir: Path) -> Path:
    """``given``, else the newest checkpoint main.py or a test/ script wrote (demo, export)."""
    if given is not None:
        return Path(given)
    roots = default_search_roots(repo_dir)
    found = find_newest_run_checkpoint(roots)
    if found is None:
        raise CheckpointError(f"no checkpoint found under {', '.join(str(root) for root in roots)}; train one "
                              f"first (bash quickstart.sh), or give --checkpoint FILE")
    return found
