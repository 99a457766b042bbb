"""The architectures' published ImageNet weights: what a bare ``--pretrained`` loads.

As in pytorch/examples, ``--pretrained`` without a file means the weights the model's
reference library publishes: torchvision's ``inception_v3`` IMAGENET1K_V1 and timm's
``legacy_xception``. They are looked up where those libraries keep them (the torch hub
cache, and for Xception also the Hugging Face cache), and downloaded into the torch hub
cache with torch's own downloader when the machine is online. ``HF_HUB_OFFLINE=1`` never
downloads. When nothing works, the error says which file to put where.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger(__name__)

_OFFLINE_VALUES = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class PublishedWeights:
    """Where one architecture's published weights come from.

    Attributes:
        description: how the log names them.
        url: the file the reference library downloads (its name is the cache file name).
        hf_repo: a Hugging Face model repository holding the same weights, if any.
        model_options: options the weights need (torchvision's Inception weights expect
            ``transform_input=True``, as ``torchvision.models.inception_v3`` sets it).
    """

    description: str
    url: str
    hf_repo: str | None = None
    model_options: dict = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


INCEPTION_V3_IMAGENET = PublishedWeights(
    description="torchvision inception_v3 IMAGENET1K_V1",
    url="https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    model_options={"transform_input": True})

XCEPTION_IMAGENET = PublishedWeights(
    description="timm legacy_xception (tf_in1k)",
    url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/xception-43020ad28.pth",
    hf_repo="timm/legacy_xception.tf_in1k")

HF_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedUnavailable(UserError):
    """The published weights are neither cached nor downloadable here."""


def torch_hub_file(weights: PublishedWeights) -> Path:
    """Where torch's downloader keeps ``weights`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.filename


def huggingface_cache() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home) / "hub"


def _huggingface_file(repo: str) -> Path | None:
    snapshots = huggingface_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    for snapshot in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        for name in HF_FILES:
            if (snapshot / name).is_file():
                return snapshot / name
    return None


def find_cached(weights: PublishedWeights) -> Path | None:
    """The cached weights file, or None."""
    hub_file = torch_hub_file(weights)
    if hub_file.is_file():
        return hub_file
    return _huggingface_file(weights.hf_repo) if weights.hf_repo else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _download(weights: PublishedWeights) -> Path:
    target = torch_hub_file(weights)
    log.info("downloading %s from %s", weights.description, weights.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(target), progress=True)
    except Exception as error:  # urllib raises several types; all mean "not here"
        raise PretrainedUnavailable(_where_to_put(weights, f"download failed ({error})")) from None
    return target


def _where_to_put(weights: PublishedWeights, reason: str) -> str:
    places = f"{torch_hub_file(weights)} (from {weights.url})"
    if weights.hf_repo:
        places += (f", or the Hugging Face repository {weights.hf_repo} in "
                   f"{huggingface_cache()}/models--{weights.hf_repo.replace('/', '--')}")
    return f"no {weights.description} weights: {reason}; put the file at {places}, or give --pretrained FILE"


def published_weights_file(weights: PublishedWeights) -> Path:
    """The local file of ``weights``: cached, else downloaded (unless offline)."""
    cached = find_cached(weights)
    if cached is not None:
        return cached
    if offline():
        raise PretrainedUnavailable(_where_to_put(weights, "not cached, and HF_HUB_OFFLINE is set"))
    return _download(weights)
