"""The benchmark scripts in a tiny configuration, so that they cannot rot.

Each script runs as a subprocess, the way people run it, and must exit 0 and write JSON
with the expected keys and positive numbers. Nothing here asserts a speed: timings on a
shared CI machine mean nothing, and the real measurements live in docs/PERFORMANCE.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A tiny ImageNet-like folder: 2 classes, 4 training JPEGs each, around 96x80 pixels.
TINY_FOLDER = ["--classes", "2", "--train-per-class", "4", "--val-per-class", "1", "--source-size", "96x80"]
TINY_STEP = ["--image-size", "75", "--batch-size", "2", "--steps", "2"]


def run_script(name: str, *args: str, timeout: int = 300) -> dict:
    out = Path(args[args.index("--json") + 1])
    # One intra-op thread: on a busy machine, OpenMP threads that wait for each other at
    # every operator make a tiny step 10-30x slower (docs/PERFORMANCE.md); these runs only
    # check that the scripts work.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / name), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-data")


def test_train_step_tiny(tmp_path):
    report = run_script("train_step.py", "--arch", "all", *TINY_STEP, "--warmup", "1", "--rounds", "1",
                        "--configs", "baseline,ours,ours-amp,ours-nchw", "--matmul-size", "128",
                        "--device", "cpu", "--json", str(tmp_path / "step.json"))
    assert report["benchmark"] == "train_step"
    assert report["env"]["versions"]["torch"] and positive(report["env"]["cpus"])
    assert set(report["archs"]) == {"inception_v3", "xception"}
    assert positive(report["matmul_peak_flops"]["float32"]) and positive(report["matmul_peak_flops"]["bfloat16"])
    for arch, result in report["archs"].items():
        assert positive(result["flops_per_image"]), arch
        assert set(result["configs"]) == {"baseline", "ours", "ours-amp", "ours-nchw"}
        for name, config in result["configs"].items():
            for key in ("images_per_second", "step_seconds", "ratio_vs_baseline", "achieved_flops", "mfu",
                        "peak_host_rss_bytes"):
                assert positive(config[key]), (arch, name, key, config[key])
            assert config["compute_dtype"] == ("bfloat16" if name == "ours-amp" else "float32")
            assert "main.py" in config["description"] or name == "baseline"
        assert result["configs"]["baseline"]["ratio_vs_baseline"] == pytest.approx(1.0)
    # Depthwise convolutions' backward counted with their groups: a training step of
    # Xception is about 3x its forward (dense-counted, it would be ~10x).
    assert report["archs"]["xception"]["flops_per_image"] < 4 * 1.13e9


def test_train_step_profile_tiny(tmp_path):
    report = run_script("train_step.py", "--arch", "xception", *TINY_STEP, "--warmup", "0", "--rounds", "1",
                        "--configs", "baseline,ours", "--matmul-size", "128", "--profile", "--device", "cpu",
                        "--json", str(tmp_path / "profile.json"))
    profiles = report["archs"]["xception"]["profile"]
    assert set(profiles) == {"baseline", "ours"}
    for name, profile in profiles.items():
        assert sum(profile["categories"].values()) == pytest.approx(1.0), name
        assert profile["categories"]["convolution"] > 0 and positive(profile["total_ms"]), name
        assert profile["top_ops"] and all(positive(op["ms"]) for op in profile["top_ops"]), name


def test_train_step_rejects_unknown_config(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--configs", "ours-fast"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown configuration 'ours-fast'" in result.stderr


def test_input_pipeline_tiny(tmp_path, data_dir):
    report = run_script("input_pipeline.py", "--data-dir", str(data_dir), *TINY_FOLDER, "--image-size", "32",
                        "--batch-size", "2", "--images", "8", "--rounds", "1", "--workers", "0,1",
                        "--loader-batches", "2", "--loader-warmup", "1", "--device", "cpu",
                        "--json", str(tmp_path / "input.json"))
    assert report["benchmark"] == "input_pipeline" and report["data"]["train_images"] == 8
    per_process = report["per_process"]
    for name in ("baseline", "ours", "decode_only"):
        assert positive(per_process[name]["images_per_second"]) and positive(per_process[name]["ms_per_image"])
    assert positive(per_process["ratio"])
    augmentations = report["augmentations"]
    assert augmentations["default"]["vs_default"] == pytest.approx(1.0)
    for name in ("--auto-augment ra", "--auto-augment ta_wide", "--auto-augment augmix", "--auto-augment imagenet",
                 "--random-erase 0.25"):
        assert positive(augmentations[name]["images_per_second"]) and positive(augmentations[name]["vs_default"])
    assert positive(augmentations["--mixup 0.2 (device)"]["ms_per_batch"])
    assert [row["workers"] for row in report["loader"]] == [0, 1]
    for row in report["loader"]:
        assert positive(row["baseline"]["images_per_second"]) and positive(row["ours"]["images_per_second"])
        assert positive(row["ratio"]) and positive(row["peak_tree_pss_bytes"])
    formats, steps = report["formats"], report["formats"]["steps_per_epoch"]
    for name in ("imagefolder", "shards"):
        assert positive(formats[name]["images_per_second_per_worker"])
        assert [row["workers"] for row in formats[name]["loader"]] == [0, 1]
        for row in formats[name]["loader"]:
            assert all(positive(row[key]) for key in ("images_per_second", "first_batch_s", "resume_step_1_s",
                                                      f"resume_step_{steps - 1}_s"))
    assert positive(report["process_peak_rss_bytes"])


def test_end_to_end_tiny(tmp_path, data_dir):
    report = run_script("end_to_end.py", "--data-dir", str(data_dir), *TINY_FOLDER, *TINY_STEP,
                        "--fps-warmup-steps", "1", "-j", "0", "--device", "cpu",
                        "--output-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "e2e.json"))
    assert report["benchmark"] == "end_to_end"
    for source in ("synthetic", "jpeg"):
        run = report["runs"][source]
        for key in ("fps", "peak_tree_pss_bytes", "peak_main_rss_bytes", "wall_seconds"):
            assert positive(run[key]), (source, key)
        assert run["peak_device_bytes"] is None  # CPU: no separate device memory
        assert (tmp_path / "runs" / f"{source}-0" / "metrics.jsonl").is_file()
    assert "--synthetic" in report["runs"]["synthetic"]["argv"] and "--data" in report["runs"]["jpeg"]["argv"]
    assert positive(report["ratio"])


@pytest.mark.slow
def test_accuracy_tiny(tmp_path, data_dir):
    report = run_script("accuracy.py", "--arch", "xception", "--configs", "reference,ours,ours-ema", "--seeds", "0",
                        "--epochs", "1", "--batch-size", "32", "--image-size", "16", "--workers", "0",
                        "--data-dir", str(data_dir), "--runs-dir", str(tmp_path / "runs"),
                        "--json", str(tmp_path / "accuracy.json"))
    assert report["benchmark"] == "accuracy"
    for name in ("reference", "ours", "ours-ema"):
        [run] = report["results"][name]
        assert 0 <= run["val_acc1"] <= 100 and len(run["history"]) == 1
        assert report["summary"][name]["val_acc1"]["n"] == 1
    assert "ema_val_acc1" in report["results"]["ours-ema"][0]
    assert (tmp_path / "runs" / "xception-ours-0" / "metrics.jsonl").is_file()


def test_scan_tiny(tmp_path):
    report = run_script("scan.py", "--files", "300", "--classes", "7", "--ranks", "2", "--json",
                        str(tmp_path / "scan.json"))
    assert [(row["ranks"], row["mode"]) for row in report["results"]] == [
        (2, mode) for mode in ("every rank scans", "rank 0 scans", "cached index")]
    assert all(positive(row["seconds"]) for row in report["results"])
    assert [row["files_listed"] for row in report["results"]] == [600, 300, 0]
