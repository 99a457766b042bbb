"""The ImageFolder scan: data that lies (symlink loops, unreadable folders, hidden files) and the
cached index of one scan per job (a file added, removed or renamed is seen)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from conftest import metrics_of, quick_args, run_main
from privileges import as_unprivileged_user
from training.data.embedded import make_imagefolder
from training.data.scan import (DatasetError, cached_scan, index_cache_file, index_for_job, load_cached_index,
                                scan_imagefolder)


@pytest.fixture
def split(tmp_path) -> Path:
    """train/ of 2 classes with 3 images each."""
    return make_imagefolder(tmp_path / "data", 2, 3, 1, image_size=16) / "train"


def counted(split: Path) -> list[tuple[str, int]]:
    return [(os.path.relpath(path, split), label) for path, label in scan_imagefolder(split).samples]


def test_a_symlink_out_of_the_class_folder_is_refused_with_its_name(split):
    (split / "class_00" / "up").symlink_to("..")  # ln -s .. train/class_00/up: a loop through train/
    with pytest.raises(DatasetError, match=f"symbolic link {split / 'class_00' / 'up'} leads out of its class "
                                           f"folder"):
        scan_imagefolder(split)


def test_a_class_folder_linked_to_another_class_is_refused(split):
    (split / "class_02").symlink_to("class_00", target_is_directory=True)
    with pytest.raises(DatasetError, match=f"class folders {split / 'class_00'} and {split / 'class_02'} are the "
                                           f"same folder"):
        scan_imagefolder(split)


def test_links_back_into_the_class_count_each_image_once(split):
    before = counted(split)
    (split / "class_00" / "again").symlink_to(".")  # a loop onto the class folder itself
    (split / "class_01" / "sub").mkdir()
    (split / "class_01" / "sub" / "deep.jpg").write_bytes((split / "class_01" / "train_0001_00000.jpg").read_bytes())
    (split / "class_01" / "sub2").symlink_to("sub")  # a second way into the same folder
    (split / "class_01" / "linked.jpg").symlink_to(split / "class_01" / "train_0001_00001.jpg")  # files: followed
    found = counted(split)
    assert found == sorted(before + [("class_01/linked.jpg", 1), ("class_01/sub/deep.jpg", 1)],
                           key=lambda item: (item[1], item[0]))


def test_hidden_files_and_macos_resource_forks_are_not_images(split):
    before = counted(split)
    (split / "class_00" / "._train_0000_00000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (split / "class_00" / ".thumbnail.jpg").write_bytes((split / "class_00" / "train_0000_00000.jpg").read_bytes())
    (split / "class_01" / ".cache").mkdir()
    (split / "class_01" / ".cache" / "x.jpg").write_bytes(b"not counted either")
    assert counted(split) == before


def test_an_unreadable_class_folder_is_named_not_empty():
    # Under the system's temporary folder, world-readable: pytest's own folders are private to
    # this user, and an unprivileged user must reach the data when the tests run as root.
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        root.chmod(0o755)
        split = make_imagefolder(root / "data", 2, 2, 1, image_size=16) / "train"
        (split / "class_01").chmod(0o000)
        outcome = as_unprivileged_user(scan_imagefolder, split)
        (split / "class_01").chmod(0o755)
    assert isinstance(outcome, DatasetError), outcome
    assert str(outcome) == (f"cannot read folder {split / 'class_01'}: Permission denied (check its permissions)")


# -- the cached index -------------------------------------------------------------------------

def settle(root: Path) -> None:
    """Date every folder a minute back: a folder changed within the last seconds is never cached."""
    past = time.time() - 60
    for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
        os.utime(folder, (past, past))


def test_the_cached_index_is_reused_until_a_file_is_added_removed_or_renamed(split, tmp_path):
    cache = tmp_path / "cache"
    settle(split)
    first = cached_scan(split, cache)
    assert index_cache_file(split, cache).is_file()
    reused = load_cached_index(split.absolute(), cache)
    assert reused is not None and reused.samples == first.samples and reused.classes == first.classes

    image = split / "class_01" / "train_0001_00002.jpg"
    changes = [("added", lambda: (split / "class_00" / "new.jpg").write_bytes(image.read_bytes())),
               ("removed", lambda: (split / "class_00" / "train_0000_00001.jpg").unlink()),
               ("renamed", lambda: image.rename(split / "class_01" / "renamed.jpg"))]
    for what, change in changes:
        change()
        assert load_cached_index(split.absolute(), cache) is None, what
        index = cached_scan(split, cache)
        assert index.samples == scan_imagefolder(split.absolute()).samples, what
        settle(split)
        cached_scan(split, cache)  # cached again
    names = [Path(path).name for path, _ in load_cached_index(split.absolute(), cache).samples]
    assert "new.jpg" in names and "train_0000_00001.jpg" not in names
    assert "renamed.jpg" in names and "train_0001_00002.jpg" not in names


def test_a_tree_changed_within_seconds_is_not_cached(split, tmp_path):
    (split / "class_00" / "fresh.jpg").write_bytes(b"x")  # its folder's time is now
    cached_scan(split, tmp_path / "cache")
    assert not index_cache_file(split, tmp_path / "cache").exists()


def test_a_cache_folder_that_cannot_be_made_costs_a_scan_nothing_more(split, tmp_path):
    settle(split)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    index = index_for_job(split, tmp_path / "cache", is_main=True)
    assert len(index.samples) == 6


def test_a_new_class_folder_is_seen(split, tmp_path):
    cache = tmp_path / "cache"
    settle(split)
    cached_scan(split, cache)
    (split / "class_02").mkdir()
    (split / "class_02" / "a.jpg").write_bytes((split / "class_00" / "train_0000_00000.jpg").read_bytes())
    assert cached_scan(split, cache).classes == ["class_00", "class_01", "class_02"]


# -- evaluation reads val/ only ---------------------------------------------------------------

def test_evaluation_does_not_read_train(trained_checkpoint, tiny_data, tmp_path):
    """``-e`` needs the validation images only: a copy of the data set without train/ evaluates."""
    data = tmp_path / "val-only"
    (data / "val").mkdir(parents=True)
    for folder in (tiny_data / "val").iterdir():
        (data / "val" / folder.name).symlink_to(folder, target_is_directory=True)
    result = run_main(*quick_args(data, tmp_path / "eval"), "-e", "--resume", trained_checkpoint)
    assert result.code == 0, result.output
    [record] = metrics_of(tmp_path / "eval")
    assert record["mode"] == "evaluate" and record["val_images"] == 15


def test_evaluation_refuses_a_validation_set_of_other_classes(trained_checkpoint, tmp_path):
    data = make_imagefolder(tmp_path / "other", 3, 1, 2, image_size=(88, 80), seed=1)
    (data / "val" / "class_02").rename(data / "val" / "class_zz")
    result = run_main(*quick_args(data, tmp_path / "eval"), "-e", "--resume", trained_checkpoint)
    assert result.code == 1
    assert "error: the checkpoint's classes are not those of the validation set in" in result.output
    assert "class 2 is 'class_02' in the checkpoint, 'class_zz' in the data" in result.output
