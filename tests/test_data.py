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

from awkward_files import add_awkward_files
from bench.reference_transforms import classic_eval_transform, classic_train_transform
from models.preprocess import INCEPTION_V3, Normalizer, PreprocessConfig
from training.data import embedded as dummy_data
from training.data.imagefolder import (Collate, DatasetError, ImageFolderDataset, build_datasets, build_loader,
                                       collate_batch, default_workers, find_split_dirs)
from training.data.sampling import EvalShardSampler, SampleKey, TrainSampler
from training.data.embedded import ensure_dummy_imagefolder, make_imagefolder
from training.data.device_loader import DeviceLoader
from training.data.transforms import EvalTransform, TrainTransform, random_resized_crop_params

MEAN, STD = INCEPTION_V3.mean, INCEPTION_V3.std
SMALL = PreprocessConfig(input_size=32, crop_pct=0.875, interpolation="bilinear", mean=MEAN, std=STD)
BROKEN = ("corrupt", "garbage")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes, 4 train + 3 val JPEGs each, plus odd colour modes and broken files in class 0."""
    root = make_imagefolder(tmp_path_factory.mktemp("data"), num_classes=3, train_per_class=4, val_per_class=3,
                            image_size=(48, 40), seed=3, sizes_jitter=0.2)
    add_awkward_files(root, num_classes=3)
    return root


def _broken_indices(dataset: ImageFolderDataset) -> list[int]:
    return [i for i, (path, _) in enumerate(dataset.samples) if any(f"extra_{kind}" in path for kind in BROKEN)]


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

def test_unreadable_images_are_replaced_and_reported(folder):
    dataset = ImageFolderDataset(folder / "train", EvalTransform(16, 18))
    broken = _broken_indices(dataset)
    assert len(broken) == 2
    for index in broken:
        key = SampleKey(index, seed=1234 + index)
        image, label, replaced = dataset[key]
        assert image.shape == (3, 16, 16) and replaced == dataset.samples[index][0]
        again, label_again, _ = dataset[key]
        assert torch.equal(image, again) and label == label_again  # the replacement follows from the key
    items = [dataset[i] for i in range(len(dataset))]
    images, labels, replaced = collate_batch(items)
    assert images.shape == (len(dataset), 3, 16, 16) and labels.shape == (len(dataset),)  # a full batch
    assert sorted(replaced) == sorted(dataset.samples[i][0] for i in broken)


def test_a_bug_in_the_transform_is_not_an_unreadable_image(folder):
    class Buggy(EvalTransform):
        def finish(self, decoded):
            raise ValueError("a bug in the resize")

    dataset = ImageFolderDataset(folder / "val", Buggy(16, 18))
    with pytest.raises(ValueError, match="a bug in the resize"):
        dataset[0]


def test_a_data_set_of_broken_files_is_an_error(tmp_path):
    make_imagefolder(tmp_path, 1, 2, 1, image_size=16)
    for path in (tmp_path / "train").rglob("*.jpg"):
        path.write_bytes(b"garbage")
    dataset = ImageFolderDataset(tmp_path / "train", EvalTransform(16, 18))
    with pytest.raises(DatasetError, match="nor 16 replacements"):
        dataset[SampleKey(0, 7)]


def test_strict_mode_names_the_file(folder):
    dataset = ImageFolderDataset(folder / "train", EvalTransform(16, 18), strict=True)
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith("extra_corrupt.jpg"))
    with pytest.raises(DatasetError, match="cannot read image .*extra_corrupt.jpg"):
        dataset[index]


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
    for transform in (TrainTransform(24, "bicubic"), EvalTransform(24, 28), Collate(False)):
        clone = pickle.loads(pickle.dumps(transform))
        assert repr(clone) == repr(transform)
    dataset = pickle.loads(pickle.dumps(ImageFolderDataset(folder / "val", EvalTransform(16, 18))))
    assert dataset[0][0].shape == (3, 16, 16)


def test_a_sample_key_fixes_the_augmentation(folder):
    train, _ = build_datasets(folder, 16, SMALL)
    torch.manual_seed(0)
    first = train[SampleKey(1, seed=99)][0]
    torch.manual_seed(5)  # the global generator does not matter, and is left alone
    state = torch.get_rng_state()
    assert torch.equal(train[SampleKey(1, seed=99)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    others = [train[SampleKey(1, seed=seed)][0] for seed in range(4)]
    assert any(not torch.equal(other, first) for other in others)


# --- samplers and loaders --------------------------------------------------------------

def test_eval_shard_sampler_covers_every_index_once():
    shards = [list(EvalShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(EvalShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


def test_val_loader_reads_everything_in_order(folder):
    _, val = build_datasets(folder, 16, SMALL)
    loader = build_loader(val, 4, EvalShardSampler(len(val)), train=False, workers=0)
    labels = torch.cat([batch_labels for _, batch_labels, _ in loader])
    assert labels.tolist() == val.targets and len(loader) == 3  # 9 images: 4 + 4 + 1


def test_train_sampler_shards_reshuffles_and_skips():
    samplers = [TrainSampler(11, seed=3, rank=rank, world_size=2) for rank in range(2)]
    epoch0 = [[key.index for key in sampler] for sampler in samplers]
    assert [len(order) for order in epoch0] == [5, 5] and not set(epoch0[0]) & set(epoch0[1])  # 1 dropped
    for sampler in samplers:
        sampler.set_epoch(1)
    assert [[key.index for key in sampler] for sampler in samplers] != epoch0
    samplers[0].set_epoch(0)
    samplers[0].skip(3)
    assert len(samplers[0]) == 2 and [key.index for key in samplers[0]] == epoch0[0][3:]
    keys = list(TrainSampler(11, seed=3, rank=0, world_size=2))
    assert list(TrainSampler(11, seed=3, rank=0, world_size=2)) == keys  # the seed decides everything
    assert [key.index for key in TrainSampler(11, seed=4, rank=0, world_size=2)] != epoch0[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_do_not_depend_on_workers(folder, workers):
    train, _ = build_datasets(folder, 16, SMALL)

    def batches(count: int) -> list[torch.Tensor]:
        loader = build_loader(train, 4, TrainSampler(len(train), seed=1), train=True, workers=count)
        return [images for images, _, _ in loader]

    reference, other = batches(0), batches(workers)
    assert len(reference) == len(train) // 4 and reference[0].shape == (4, 3, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(reference, other))


def test_collate_memory_formats(folder):
    _, val = build_datasets(folder, 16, SMALL)
    items = [val[i] for i in range(3)]
    nhwc = Collate(channels_last=True)(items)[0]
    nchw = Collate(channels_last=False)(items)[0]
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert nchw.is_contiguous() and torch.equal(nhwc, nchw)


def test_default_workers():
    cpus = len(os.sched_getaffinity(0))
    assert default_workers() == min(8, max(0, cpus - 1))
    assert default_workers(processes_on_node=10 * cpus) == 0


# --- device stage ----------------------------------------------------------------------

def test_device_loader_normalises_on_device(folder):
    _, val = build_datasets(folder, 16, SMALL)
    loader = build_loader(val, 4, EvalShardSampler(len(val)), train=False, workers=0)
    raw = list(loader)
    device_loader = DeviceLoader(loader, torch.device("cpu"), Normalizer(MEAN, STD))
    assert len(device_loader) == len(loader) and device_loader.sampler is loader.sampler
    device_loader.set_epoch(3)  # no set_epoch on an eval sampler: a no-op
    batches = list(device_loader)
    assert len(batches) == len(raw)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for (images, labels, replaced), (raw_images, raw_labels, _) in zip(batches, raw):
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(images, (raw_images.float() / 255 - mean) / std, atol=1e-5, rtol=0)
        assert labels.dtype == torch.int64 and torch.equal(labels, raw_labels) and replaced == []

    contiguous = build_loader(val, 4, EvalShardSampler(len(val)), train=False, workers=0, channels_last=False)
    plain = next(iter(DeviceLoader(contiguous, "cpu", Normalizer(MEAN, STD), channels_last=False)))[0]
    assert plain.is_contiguous()
    torch.testing.assert_close(plain, batches[0][0], atol=0, rtol=0)


def test_normalizer_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        Normalizer(MEAN, STD)(torch.zeros(1, 3, 4, 4))


def test_device_loader_forwards_set_epoch_and_skip(folder):
    train, _ = build_datasets(folder, 16, SMALL)
    loader = build_loader(train, 4, TrainSampler(len(train), seed=0), train=True, workers=0)
    device_loader = DeviceLoader(loader, "cpu", Normalizer(MEAN, STD))
    device_loader.set_epoch(5)
    device_loader.skip(8)
    assert device_loader.sampler.epoch == 5 and len(device_loader) == (len(train) - 8) // 4


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
