"""Classifying image files with a trained model, the library behind demo.py (and the ONNX check).

Images go through validation's preprocessing (``read_eval_image``: Resize + CenterCrop, uint8,
then the one ``Normalizer``), so a file gets the class its validation image would. Two
classifiers take the same uint8 batches: ``TorchClassifier`` (the model on a device, in the
memory format that device's capability row allows) and ``OnnxClassifier`` (an exported
model in onnxruntime). ``classify_files`` runs one over many files in batches, decoded by
DataLoader workers; a file that cannot be read is reported and skipped, never fatal.
"""
from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from models.errors import UserError
from models.preprocess import Normalizer, PreprocessConfig
from training.data.scan import IMAGE_EXTENSIONS, is_image
from training.data.transforms import ImageReadError, read_eval_image
from training.device import Capabilities
from training.progress import Progress


class PredictionError(UserError):
    """Images or a model that cannot be used for inference; the message names the path."""


# -- the classifiers ----------------------------------------------------------------------

class TorchClassifier:
    """The PyTorch model on ``device``: uint8 N x 3 x S x S pixels in, logits out.

    Pixels are put in the memory format of the device's capability row on the host, before
    the copy: channels-last where the device takes it (the model too), else contiguous NCHW
    (an NPU rejects channels-last tensors).
    """

    def __init__(self, model: nn.Module, preprocess: PreprocessConfig, device: torch.device, caps: Capabilities):
        self.device = device
        self.memory_format = torch.channels_last if caps.channels_last else torch.contiguous_format
        self.model = model.eval().to(device)
        if caps.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.normalize = Normalizer(preprocess.mean, preprocess.std, device)
        self.description = f"PyTorch on {device}"

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 logits on the CPU."""
        on_device = pixels.contiguous(memory_format=self.memory_format).to(self.device)
        return self.model(self.normalize(on_device)).float().cpu()


class OnnxClassifier:
    """An exported model (``pthtar2onnx.py``) in onnxruntime on the CPU, fed like ``TorchClassifier``."""

    def __init__(self, path: str | os.PathLike, preprocess: PreprocessConfig):
        try:
            import onnxruntime
        except ImportError:
            raise PredictionError("--onnx needs onnxruntime: pip install onnxruntime "
                                  "(or pip install -r requirements.txt)") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise PredictionError(f"ONNX model not found: {self.path}")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types for files it cannot load
            raise PredictionError(f"cannot load ONNX model {self.path}: {str(error).strip().splitlines()[0]}") \
                from None
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        self.input_shape = list(model_input.shape)
        self.normalize = Normalizer(preprocess.mean, preprocess.std)
        self.description = "onnxruntime on cpu"

    @property
    def image_size(self) -> int | None:
        """The square input size the file was exported for, when it fixes one."""
        height, width = self.input_shape[2:4]
        return height if isinstance(height, int) and height == width else None

    @property
    def batch_size(self) -> int | None:
        """The batch size the file was exported for (``--batch-size``), or None for a dynamic axis."""
        return self.input_shape[0] if isinstance(self.input_shape[0], int) else None

    def check_fits(self, image_size: int, num_classes: int) -> None:
        if self.image_size is not None and self.image_size != image_size:
            raise PredictionError(f"{self.path} takes {self.image_size}x{self.image_size} images, not "
                                  f"{image_size}x{image_size}; leave out --image-size")
        classes = self.session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != num_classes:
            raise PredictionError(f"{self.path} has {classes} classes, the checkpoint {num_classes}: give the "
                                  f"checkpoint it was exported from")

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 logits, running a fixed-batch file on zero-padded batches."""
        count, fixed = pixels.shape[0], self.batch_size
        if fixed is not None and count != fixed:
            return torch.cat([self.logits(part) for part in _fixed_batches(pixels, fixed)])[:count]
        batch = self.normalize(pixels).contiguous()  # onnxruntime reads plain NCHW memory
        (logits,) = self.session.run(None, {self.input_name: batch.numpy()})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def _fixed_batches(pixels: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, pixels.shape[0], size):
        part = pixels[start:start + size]
        if part.shape[0] < size:
            part = torch.cat([part, part.new_zeros((size - part.shape[0], *part.shape[1:]))])
        yield part


# -- files ----------------------------------------------------------------------------------

def find_images(pattern: str) -> tuple[list[Path], bool]:
    """The files ``pattern`` names, and whether it named several: a folder (its image files, in
    sub-folders too), a glob pattern (every file it matches) or one file."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and is_image(p.name))
        if not found:
            raise PredictionError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
        return found, True
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
        if not found:
            raise PredictionError(f"no files match {pattern}")
        return found, True
    return [path], False


class _ImageFiles(Dataset):
    """Each file as validation sees it, or the reason it cannot be read."""

    def __init__(self, paths: Sequence[Path], image_size: int, preprocess: PreprocessConfig):
        self.paths, self.image_size, self.preprocess = list(paths), image_size, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return read_eval_image(self.paths[index], self.image_size, self.preprocess), index, None
        except ImageReadError as error:
            return None, index, str(error)


def _collate(items: list[tuple[torch.Tensor | None, int, str | None]]) -> tuple[torch.Tensor | None, list, list]:
    readable = [(pixels, index) for pixels, index, _ in items if pixels is not None]
    pixels = torch.cat([p for p, _ in readable]) if readable else None
    return pixels, [index for _, index in readable], [(index, error) for _, index, error in items if error]


@dataclass(frozen=True)
class Prediction:
    path: Path
    classes: list[int]  # the top-k class indices, most probable first
    probabilities: list[float]


@dataclass
class Outcome:
    """What ``classify_files`` did: the predictions in file order, the files it could not read
    (path, reason), and the images per second of the whole pass."""

    predictions: list[Prediction] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    images_per_second: float = 0.0


def top_k(logits: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The ``k`` most probable classes of each row and their softmax probabilities."""
    top = logits.softmax(dim=1).topk(min(k, logits.shape[1]), dim=1)
    return top.indices.tolist(), top.values.tolist()


def classify_files(classifier: TorchClassifier | OnnxClassifier, paths: Sequence[Path], image_size: int,
                   preprocess: PreprocessConfig, topk: int, batch_size: int, workers: int,
                   on_unreadable=None) -> Outcome:
    """Classify ``paths`` in batches; ``on_unreadable(path, reason)`` hears of each file skipped."""
    loader = DataLoader(_ImageFiles(paths, image_size, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    outcome = Outcome()
    started = time.perf_counter()
    with Progress(len(paths), "classifying", unit="img") as progress:
        for pixels, indices, failed in loader:
            for index, reason in failed:
                outcome.unreadable.append((paths[index], reason))
                if on_unreadable is not None:
                    on_unreadable(paths[index], reason)
            if pixels is not None:
                classes, probabilities = top_k(classifier.logits(pixels), topk)
                outcome.predictions.extend(Prediction(paths[index], c, p)
                                           for index, c, p in zip(indices, classes, probabilities))
            progress.advance(len(indices) + len(failed))
    elapsed = time.perf_counter() - started
    outcome.images_per_second = len(outcome.predictions) / elapsed if elapsed > 0 else 0.0
    return outcome
