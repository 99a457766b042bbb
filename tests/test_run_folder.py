"""The output folder: one run per folder, never a silent fresh start, and a run's files kept
whatever the storage does (full disk, read-only folder, a kill in the middle of a write).

Real main.py runs on the tiny data: in this process where the run stops before training, as a
child process where the storage must fail under it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from conftest import metrics_of, quick_args, run_main
from processes import main_command
from storage import full_disk, unwritable_folder
from training.checkpoint import load_checkpoint

RUN_FILES = ("checkpoint.pth.tar", "model_best.pth.tar", "metrics.jsonl", "args.json", "curves.png")


def copy_run(trained_checkpoint: Path, folder: Path) -> Path:
    """A finished run's folder (the session's trained one), copied."""
    shutil.copytree(trained_checkpoint.parent, folder)
    return folder


def contents(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha1(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if path.is_file()}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_new_run_never_mixes_with_the_run_already_in_its_folder(trained_checkpoint, tiny_data, tmp_path):
    run = copy_run(trained_checkpoint, tmp_path / "run")
    before = contents(run)
    assert set(RUN_FILES) <= set(before) and any(name.startswith("events.out.tfevents") for name in before)

    fresh = run_main(*quick_args(tiny_data, run))
    assert fresh.code == 1 and "Traceback" not in fresh.output
    [line] = error_lines(fresh.output)
    assert line.startswith(f"error: {run} already holds a run (checkpoint.pth.tar, model_best.pth.tar, metrics.jsonl,")
    assert line.endswith("continue it with --resume auto, write to another --output_dir, or replace it with "
                         "--overwrite (removes those files only)")
    other = copy_run(trained_checkpoint, tmp_path / "other")
    branched = run_main(*quick_args(tiny_data, run, "inception_v3", "--resume", other / "checkpoint.pth.tar"))
    assert branched.code == 1 and "already holds a run" in branched.output

    finished = run_main(*quick_args(tiny_data, run, "inception_v3", "--resume", "auto"))
    assert finished.code == 0, finished.output
    assert f"--resume auto: resuming from {run / 'checkpoint.pth.tar'}" in finished.output
    assert "the run is finished (epoch 1 of 1, best Acc@1" in finished.output and "Epoch:" not in finished.output
    assert contents(run) == before

    evaluated = run_main(*quick_args(tiny_data, run, "inception_v3", "-e", "--resume", run / "model_best.pth.tar"))
    assert evaluated.code == 0, evaluated.output
    assert [record["mode"] for record in metrics_of(run)] == ["train", "evaluate"]  # appended, nothing refused

    (run / "notes.txt").write_text("the team's notes")
    replaced = run_main(*quick_args(tiny_data, run, "xception", "--image-size", "48", "-b", "2", "--max-steps", "1",
                                    "--overwrite"))
    assert replaced.code == 0, replaced.output
    assert ("--overwrite: removed checkpoint.pth.tar, model_best.pth.tar, metrics.jsonl, args.json, curves.png, "
            "events.out.tfevents.") in replaced.output
    assert f"from {run} (kept what this project does not write: notes.txt)" in replaced.output
    assert (run / "notes.txt").read_text() == "the team's notes"
    assert [(r["mode"], r["arch"]) for r in metrics_of(run)] == [("train", "xception")]  # one run, not two
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


def test_a_lock_and_temporary_files_left_by_a_killed_run_are_taken_over_and_removed(trained_checkpoint, tiny_data,
                                                                                  tmp_path):
    run = copy_run(trained_checkpoint, tmp_path / "run")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    (run / ".run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                               "started": "2026-11-30T08:00:00+00:00"}))
    (run / ".checkpoint.pth.tar.1a2b3c4d.tmp").write_bytes(os.urandom(3 * 2**20))  # a save killed half-way
    (run / ".curves.png.k2x9_w.png").write_bytes(b"half a picture")  # the curves' name in earlier versions
    (run / ".notes.txt.tmp").write_text("not ours: kept")
    result = run_main(*quick_args(tiny_data, run, "inception_v3", "--resume", "auto"))
    assert result.code == 0, result.output
    assert (f"{run}: took over the lock of a run that ended without releasing it (host {socket.gethostname()}, "
            f"pid {dead}, started 2026-11-30T08:00:00+00:00)") in result.output
    assert (f"removed the temporary file(s) of an interrupted write from {run}: .checkpoint.pth.tar.1a2b3c4d.tmp "
            f"(3 MB), .curves.png.k2x9_w.png (0 MB)") in result.output
    assert sorted(path.name for path in run.glob(".*")) == [".notes.txt.tmp"]  # the lock went with the run


def test_resume_auto_never_starts_over_a_folder_whose_checkpoint_is_unreadable(trained_checkpoint, tiny_data,
                                                                             tmp_path):
    run = copy_run(trained_checkpoint, tmp_path / "run")
    last = run / "checkpoint.pth.tar"
    last.write_bytes(last.read_bytes()[:4096])  # truncated by a disk that failed
    before = contents(run)
    result = run_main(*quick_args(tiny_data, run, "inception_v3", "--resume", "auto"))
    assert result.code == 1 and "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert line.startswith(f"error: --resume auto: cannot read checkpoint {last}: ")
    assert line.endswith(f"to continue from {run / 'model_best.pth.tar'} instead, give --resume "
                         f"{run / 'model_best.pth.tar'}")
    assert contents(run) == before and "starting fresh" not in result.output
    (run / "model_best.pth.tar").unlink()
    alone = run_main(*quick_args(tiny_data, run, "inception_v3", "--resume", "auto"))
    assert alone.code == 1 and f"cannot read checkpoint {last}" in alone.output


def test_a_run_never_writes_another_runs_files_through_a_link(trained_checkpoint, tiny_data, tmp_path):
    """A checkpoint that is a link to another run's (to continue from it) is read through the
    link; what the run saves replaces the link, never the other run's file."""
    other = copy_run(trained_checkpoint, tmp_path / "other")
    before = contents(other)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth.tar").symlink_to(other / "checkpoint.pth.tar")
    result = run_main(*quick_args(tiny_data, run, "inception_v3", "--max-steps", "2", "--epochs", "2",
                                  "--resume", "auto"))
    assert result.code == 0, result.output
    assert contents(other) == before
    assert not (run / "checkpoint.pth.tar").is_symlink() and load_checkpoint(run / "checkpoint.pth.tar")["epoch"] == 2


def test_output_that_cannot_be_written_is_one_line_naming_the_path(tiny_data, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    below_a_file = a_file / "run"
    with unwritable_folder(tmp_path / "readonly") as readonly:
        cases = {a_file: f"error: --output_dir {a_file} is a file, not a folder: give a folder",
                 below_a_file: f"error: cannot create the output folder {below_a_file}: Not a directory",
                 readonly: f"error: cannot write into the output folder {readonly}: "}
        for output, expected in cases.items():
            result = run_main(*quick_args(tiny_data, output, "xception"))
            assert result.code == 1 and "Traceback" not in result.output, result.output
            [line] = error_lines(result.output)
            assert line.startswith(expected), line
        assert line.endswith(("Read-only file system", "Permission denied"))
        assert not any(readonly.iterdir())
    assert a_file.read_text() == "not a folder"


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_previous_checkpoint(trained_checkpoint, tiny_data,
                                                                                  tmp_path):
    """The resumed run trains its second epoch, then cannot write its checkpoint: one line
    naming the file and the OS's reason, the first epoch's checkpoint untouched, no
    temporary file left."""
    size = trained_checkpoint.stat().st_size
    with full_disk(tmp_path / "disk", holds=size, free=8 * 2**20) as limit:
        run = tmp_path / "disk"
        shutil.copy(trained_checkpoint, run / "checkpoint.pth.tar")
        before = contents(run)
        command = main_command(*quick_args(tiny_data, run, "inception_v3", "--resume", "auto", "--epochs", "2",
                                           "--max-steps", "1", "--progress", "lines"))
        process = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                                 timeout=600, preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
        output = process.stdout + process.stderr
        assert process.returncode == 1 and "Traceback" not in output, output[-3000:]
        [line] = error_lines(output)
        reason = "No space left on device" if limit is None else "File too large"
        assert line.startswith(f"error: cannot write {run / 'checkpoint.pth.tar'}: {reason}"), line
        assert line.endswith(f"{run / 'checkpoint.pth.tar'} still holds the previous checkpoint"), line
        assert contents(run)["checkpoint.pth.tar"] == before["checkpoint.pth.tar"]
        assert load_checkpoint(run / "checkpoint.pth.tar")["epoch"] == 1
        assert not list(run.glob(".*.tmp")) and not (run / ".run.lock").exists()


def test_files_get_the_umask_mode_not_a_private_one(trained_checkpoint):
    umask = os.umask(0o022)
    os.umask(umask)
    for name in RUN_FILES:
        mode = (trained_checkpoint.parent / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, (name, oct(mode))
