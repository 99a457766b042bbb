"""Data pipeline: folder checks, unreadable images, colour modes, transforms against
torchvision, samplers, loaders, the device stage and the embedded dummy data set."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from models.preprocess import INCEPTION_V3, PreprocessConfig
from training import dummy_data
from training.data import (DatasetError, DeviceLoader, EvalShardSampler, ImageFolderDataset, build_datasets,
                           build_loader, collate_batch, default_workers, find_split_dirs)
from training.dummy_data import ensure_dummy_imagefolder, make_imagefolder
from training.transforms import (EvalTransform, TrainTransform, classic_eval_transform, classic_train_transform,
                                 random_resized_crop_params)

MEAN, STD = INCEPTION_V3.mean, INCEPTION_V3.std
SMALL = PreprocessConfig(input_size=32, crop_pct=0.875, interpolation="bilinear", mean=MEAN, std=STD,
                         min_input_size=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes, 4 train + 3 val JPEGs each, plus odd colour modes and broken files in class 0."""
    return make_imagefolder(tmp_path_factory.mktemp("data"), num_classes=3, train_per_class=4, val_per_class=3,
                            image_size=(48, 40), seed=3, sizes_jitter=0.2,
                            extras=("gray", "cmyk", "palette", "rgba", "corrupt", "garbage"))


def _classic_uint8(tensor: torch.Tensor) -> torch.Tensor:
    """Undo ToTensor + Normalize: back to the 0..255 pixel values."""
    return tensor * torch.tensor(STD).view(3, 1, 1) * 255 + torch.tensor(MEAN).view(3, 1, 1) * 255


# --- folder checks ---------------------------------------------------------------------

def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match=f"data path not found: {tmp_path / 'nope'}"):
        find_split_dirs(tmp_path / "nope")


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_is_named(tmp_path, missing):
    make_imagefolder(tmp_path, 2, 1, 1, image_size=16)
    shutil.rmtree(tmp_path / missing)
    with pytest.raises(DatasetError, match=f"no '{missing}' folder in {tmp_path}") as error:
        build_datasets(tmp_path, 16, SMALL)
    assert f"{tmp_path}/train/<class>/<image>" in str(error.value)


def test_empty_class_folder_is_named(tmp_path):
    make_imagefolder(tmp_path, 2, 1, 1, image_size=16)
    (tmp_path / "train" / "zebra").mkdir()
    (tmp_path / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="class folder has no images: .*zebra"):
        build_datasets(tmp_path, 16, SMALL)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match=f"no class folders in {tmp_path / 'train'}"):
        build_datasets(tmp_path, 16, SMALL)


def test_val_classes_must_match_train(tmp_path):
    make_imagefolder(tmp_path, 3, 1, 1, image_size=16)
    os.rename(tmp_path / "val" / "class_02", tmp_path / "val" / "class_99")
    with pytest.raises(DatasetError, match="only in train: class_02; only in val: class_99"):
        build_datasets(tmp_path, 16, SMALL)


def test_scan_finds_classes_and_extensions(tmp_path):
    make_imagefolder(tmp_path, 2, 2, 1, image_size=16, fmt="PNG")
    (tmp_path / "train" / "class_01" / "upper.PNG").write_bytes(
        (tmp_path / "train" / "class_01" / "train_0001_00000.png").read_bytes())
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    train, val = build_datasets(tmp_path, 16, SMALL)
    assert train.classes == val.classes == ["class_00", "class_01"]
    assert len(train) == 5 and train.targets == [0, 0, 1, 1, 1]
    assert [label for _, label in train.samples] == train.targets


# --- unreadable images and colour modes ------------------------------------------------

def test_unreadable_images_are_skipped_and_reported(folder):
    dataset = ImageFolderDataset(folder / "train", EvalTransform(16, 18))
    broken = {str(folder / "train" / "class_00" / f"extra_{kind}.jpg") for kind in ("corrupt", "garbage")}
    items = [dataset[i] for i in range(len(dataset))]
    assert {path for image, _, path in items if image is None} == broken
    images, labels, skipped = collate_batch(items)
    assert set(skipped) == broken
    assert images.shape == (len(dataset) - 2, 3, 16, 16) and labels.shape == (len(dataset) - 2,)
    loader = build_loader(dataset, 4, train=False, workers=0)
    assert sorted(p for _, _, batch_skipped in loader for p in batch_skipped) == sorted(broken)


def test_strict_mode_names_the_file(folder):
    dataset = ImageFolderDataset(folder / "train", EvalTransform(16, 18), strict=True)
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith("extra_corrupt.jpg"))
    with pytest.raises(DatasetError, match="cannot read image .*extra_corrupt.jpg"):
        dataset[index]


def test_all_corrupt_batch_is_empty():
    images, labels, skipped = collate_batch([(None, 0, "a.jpg"), (None, 1, "b.jpg")])
    assert images.shape == (0, 3, 0, 0) and images.dtype == torch.uint8
    assert labels.shape == (0,) and labels.dtype == torch.int64
    assert skipped == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("kind, mode", [("gray", "L"), ("cmyk", "CMYK"), ("palette", "P"), ("rgba", "RGBA")])
def test_colour_modes_become_rgb(folder, kind, mode):
    path = next((folder / "train" / "class_00").glob(f"extra_{kind}.*"))
    with Image.open(path) as img:
        assert img.mode == mode
    for transform in (TrainTransform(24), EvalTransform(24, 28)):
        with Image.open(path) as img:
            out = transform(img)
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    # Same pixels as the classic pipeline (convert("RGB") first: alpha dropped, not composited).
    with Image.open(path) as img:
        ours = EvalTransform(24, 28)(img).float()
    with Image.open(path) as img:
        classic = _classic_uint8(classic_eval_transform(24, 28, MEAN, STD)(img))
    assert (ours - classic).abs().mean() < 1.0
    if kind == "gray":
        assert torch.equal(ours[0], ours[1]) and torch.equal(ours[1], ours[2])


# --- transforms ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(40, 30), (30, 40), (400, 30), (30, 400), (7, 7)])
def test_crop_sampling_matches_torchvision(size):
    width, height = size
    image = Image.new("RGB", size)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for seed in range(40):
        torch.manual_seed(seed)
        ours = random_resized_crop_params(width, height, scale, ratio)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        theirs = T.RandomResizedCrop.get_params(image, list(scale), list(ratio))
        assert ours == theirs
        assert torch.equal(after_ours, torch.rand(1))  # same number of RNG draws


@pytest.mark.parametrize("size", [(48, 40), (17, 60), (20, 20)])
def test_transform_shapes(tmp_path, size):
    path = tmp_path / "x.jpg"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    for transform in (TrainTransform(32), EvalTransform(32, 37)):
        with Image.open(path) as img:
            out = transform(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        assert out.permute(1, 2, 0).is_contiguous()  # HWC memory: collate stacks it as NHWC


def test_train_transform_matches_classic_given_seed(tmp_path):
    """Same seed -> same crop and same flip as RandomResizedCrop + RandomHorizontalFlip."""
    make_imagefolder(tmp_path, 1, 12, 0, image_size=(48, 36), fmt="PNG", seed=5)
    paths = sorted((tmp_path / "train" / "class_00").glob("*.png"))
    ours, classic = TrainTransform(32), classic_train_transform(32, MEAN, STD)
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        with Image.open(path) as img:
            a = ours(img).float()
        torch.manual_seed(seed)
        with Image.open(path) as img:
            b = _classic_uint8(classic(img))
        # Only the crop's border pixels may differ: the box resize reads the real neighbours
        # where a crop-then-resize clamps at the crop edge.
        assert (a - b).abs().mean() < 1.5, path.name


def _eval_pair(path: Path, size: int, resize: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    with Image.open(path) as img:
        ours = EvalTransform(size, resize)(img).float()
        decoded_size = img.size  # draft() shrinks the lazily opened image in place
    with Image.open(path) as img:
        classic = _classic_uint8(classic_eval_transform(size, resize, MEAN, STD)(img))
    return ours, classic, decoded_size


def test_eval_transform_matches_resize_center_crop(tmp_path):
    make_imagefolder(tmp_path, 1, 2, 0, image_size=(80, 60), seed=7)
    path = next((tmp_path / "train" / "class_00").glob("*.jpg"))
    # 60 px short side, resize 37, crop 32: the crop spans 52 px < 2 x 32, full decode.
    ours, classic, decoded = _eval_pair(path, 32, 37)
    assert decoded == (80, 60)
    assert (ours - classic).abs().mean() < 0.1 and (ours - classic).abs().max() <= 2
    # Crop 16 from resize 18: the crop spans 53 px >= 2 x 16, decoded at half size.
    ours, classic, decoded = _eval_pair(path, 16, 18)
    assert decoded == (40, 30)
    assert (ours - classic).abs().mean() < 3.0


def test_transforms_pickle(folder):
    for transform in (TrainTransform(24, "bicubic"), EvalTransform(24, 28)):
        clone = pickle.loads(pickle.dumps(transform))
        assert repr(clone) == repr(transform)
    dataset = pickle.loads(pickle.dumps(ImageFolderDataset(folder / "val", EvalTransform(16, 18))))
    assert dataset[0][0].shape == (3, 16, 16)


# --- samplers and loaders --------------------------------------------------------------

def test_eval_shard_sampler_covers_every_index_once():
    shards = [list(EvalShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(EvalShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


def test_val_loader_reads_everything_in_order(folder):
    _, val = build_datasets(folder, 16, SMALL)
    loader = build_loader(val, 4, train=False, workers=0)
    labels = torch.cat([batch_labels for _, batch_labels, _ in loader])
    assert labels.tolist() == val.targets and len(loader) == 3  # 9 images: 4 + 4 + 1


def _first_batch(dataset, workers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(123)  # augmentation RNG when workers == 0
    loader = build_loader(dataset, 4, train=True, workers=workers, seed=seed, persistent_workers=False)
    images, labels, _ = next(iter(loader))
    return images, labels


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_reproducible_given_seed(folder, workers):
    train, _ = build_datasets(folder, 16, SMALL)
    images_a, labels_a = _first_batch(train, workers, seed=1)
    images_b, labels_b = _first_batch(train, workers, seed=1)
    assert labels_a.shape == (4,) and images_a.shape == (4, 3, 16, 16)
    assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)
    order = [list(build_loader(train, 1, train=True, workers=0, seed=s).sampler) for s in (1, 2)]
    assert order[0] != order[1]  # the seed does choose the order


def test_train_loader_drops_last_and_reshuffles(folder):
    train, _ = build_datasets(folder, 16, SMALL)
    loader = build_loader(train, 5, train=True, workers=0, seed=0)
    assert len(loader) == len(train) // 5
    epochs = [list(loader.sampler) for _ in range(2)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == list(range(len(train)))
    loader.sampler.set_epoch(0)
    assert list(loader.sampler) == epochs[0]  # resuming at an epoch replays its order


def test_default_workers():
    cpus = len(os.sched_getaffinity(0))
    assert default_workers() == min(8, max(0, cpus - 1))
    assert default_workers(world_size=10 * cpus) == 0


# --- device stage ----------------------------------------------------------------------

def test_device_loader_normalises_on_device(folder):
    _, val = build_datasets(folder, 16, SMALL)
    loader = build_loader(val, 4, train=False, workers=0)
    raw = list(loader)
    device_loader = DeviceLoader(loader, torch.device("cpu"), MEAN, STD)
    assert len(device_loader) == len(loader) and device_loader.sampler is loader.sampler
    device_loader.set_epoch(3)  # no set_epoch on a sequential sampler: a no-op
    batches = list(device_loader)
    assert len(batches) == len(raw)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for (images, labels, skipped), (raw_images, raw_labels, _) in zip(batches, raw):
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(images, (raw_images.float() / 255 - mean) / std, atol=1e-5, rtol=0)
        assert labels.dtype == torch.int64 and torch.equal(labels, raw_labels) and skipped == []

    plain = next(iter(DeviceLoader(loader, "cpu", MEAN, STD, channels_last=False, dtype=torch.bfloat16)))[0]
    assert plain.dtype == torch.bfloat16 and plain.is_contiguous()


def test_device_loader_passes_set_epoch_and_empty_batches(folder):
    train, _ = build_datasets(folder, 16, SMALL)
    device_loader = DeviceLoader(build_loader(train, 4, train=True, workers=0), "cpu", MEAN, STD)
    device_loader.set_epoch(5)
    assert device_loader.sampler.epoch == 5
    empty = DeviceLoader([collate_batch([(None, 0, "x.jpg")])], "cpu", MEAN, STD)
    images, labels, skipped = next(iter(empty))
    assert images.shape == (0, 3, 0, 0) and labels.numel() == 0 and skipped == ["x.jpg"]


# --- embedded dummy data set -----------------------------------------------------------

def test_make_imagefolder_is_deterministic(tmp_path):
    a = make_imagefolder(tmp_path / "a", 2, 2, 1, image_size=(24, 20), seed=4, sizes_jitter=0.3)
    b = make_imagefolder(tmp_path / "b", 2, 2, 1, image_size=(24, 20), seed=4, sizes_jitter=0.3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jpg")) and len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_ensure_dummy_imagefolder_builds_once(tmp_path):
    root = ensure_dummy_imagefolder(tmp_path)
    assert root == tmp_path / dummy_data.DUMMY_VERSION
    train, val = build_datasets(root, 32, SMALL)
    assert len(train.classes) == dummy_data.DUMMY_NUM_CLASSES
    assert len(train) == dummy_data.DUMMY_NUM_CLASSES * dummy_data.DUMMY_TRAIN_PER_CLASS
    assert len(val) == dummy_data.DUMMY_NUM_CLASSES * dummy_data.DUMMY_VAL_PER_CLASS
    with Image.open(train.samples[0][0]) as img:
        assert img.format == "JPEG" and 100 <= min(img.size) <= max(img.size) <= 160
    stamp = {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}
    assert ensure_dummy_imagefolder(tmp_path) == root
    assert {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]} == stamp
    assert [p.name for p in tmp_path.iterdir()] == [dummy_data.DUMMY_VERSION]  # no staging left


def test_ensure_dummy_imagefolder_loses_race_cleanly(tmp_path, monkeypatch):
    """Another process finishing first: its folder is kept and ours is thrown away."""
    real = dummy_data.make_imagefolder

    def racing(root, *args, **kwargs):
        real(tmp_path / dummy_data.DUMMY_VERSION, 1, 1, 1, image_size=8)  # the winner's copy
        return real(root, 1, 1, 1, image_size=8)

    monkeypatch.setattr(dummy_data, "make_imagefolder", racing)
    root = ensure_dummy_imagefolder(tmp_path)
    assert not (root / "dataset.json").exists()  # the winner's copy, untouched
    assert [p.name for p in tmp_path.iterdir()] == [dummy_data.DUMMY_VERSION]
