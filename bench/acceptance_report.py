"""What ``bench/acceptance.py`` reports: the machine (hardware, driver, versions) and the two
report files, ``report.json`` for scripts and ``report.md`` for people."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from bench import common
from training import device as devices

GB = 1e9


def _tool_output(command: list[str]) -> str | None:
    """A vendor tool's output (nvidia-smi, npu-smi), None where it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_facts(device_type: str) -> dict[str, Any]:
    """The accelerator's driver and toolkit versions, from its vendor tool and torch."""
    facts: dict[str, Any] = {}
    if device_type == "cuda":
        listing = _tool_output(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,power.limit,"
                                "clocks.max.sm", "--format=csv,noheader"])
        facts["nvidia_smi"] = listing.splitlines() if listing else None
        facts["driver"] = listing.splitlines()[0].split(",")[2].strip() if listing else None
    if device_type == "npu":
        listing = _tool_output(["npu-smi", "info"])
        found = re.search(r"Version:\s*([\w.\-]+)", listing or "")
        facts["driver"] = found.group(1) if found else None
        facts["npu_smi"] = listing.splitlines()[:12] if listing else None
        facts["torch_npu"] = _package_version("torch_npu") or _package_version("torch-npu")
        facts["cann"] = getattr(torch.version, "cann", None)  # set by torch_npu
    return facts


def machine(device: torch.device) -> dict[str, Any]:
    """Hardware, driver and software versions; the device's capability row."""
    env = common.environment(device)
    count = devices.device_count(device.type)
    env["devices"] = {"type": device.type, "count": count,
                      "names": [devices.describe(torch.device(device.type, index)) for index in range(count)]
                      if device.type in ("cuda", "npu") else [devices.describe(device)]}
    env["driver"] = driver_facts(device.type)
    for name in ("onnx", "onnxruntime"):  # the export check's
        env["versions"][name] = _package_version(name)
    row = dataclasses.asdict(devices.capabilities(device.type))
    env["capabilities"] = json.loads(json.dumps(row, default=str))
    return env


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


# -- report.md ----------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(common.fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
              for row in rows]
    return lines + [""]


def _gib(value: Any) -> str:
    return f"{value / 1024 ** 3:.1f} GiB" if isinstance(value, (int, float)) and value else "-"


def _machine_section(env: dict[str, Any]) -> list[str]:
    versions = env["versions"]
    rows = [["device", ", ".join(env["devices"]["names"]) + f" ({env['devices']['count']} of this type)"],
            ["host CPU", f"{env['host_cpu']}, {env['cpus']} usable cores, {env['memory_gib']} GiB"],
            ["software", ", ".join(f"{name} {version}" for name, version in versions.items() if version)]]
    for key in ("cuda", "cudnn"):
        if env.get(key):
            rows.append([key, str(env[key])])
    for key, value in env["driver"].items():
        if value and not isinstance(value, list):
            rows.append([key, str(value)])
    caps = env["capabilities"]
    rows.append(["capability row", f"channels_last {caps['channels_last']}, default AMP dtype "
                                   f"{caps['default_amp_dtype']}, optimizer kernel {caps['optimizer_kernel']}, "
                                   f"process group {caps['dist_backend']}"])
    rows.append(["load average", f"{env.get('load_average_at_start')} at start, {env.get('load_average_at_end')} "
                                 f"at end"])
    return ["## Machine", ""] + _table(["", ""], rows)


def _correctness_section(correctness: dict[str, Any]) -> list[str]:
    if correctness.get("skipped"):
        return ["## Correctness", "", f"not run: {correctness['skipped']}", ""]
    verdict = "all passed" if correctness["passed"] else "FAILED"
    rows = [[check["name"], check["status"], check["detail"].replace("|", "/"), f"{check['seconds']:.0f}"]
            for check in correctness["checks"]]
    return ["## Correctness: " + verdict, ""] + _table(["check", "result", "detail", "s"], rows)


def speed_section(speed: dict[str, Any]) -> list[str]:
    if speed.get("skipped"):
        return ["## Speed", "", f"not run: {speed['skipped']}", ""]
    lines = ["## Speed", ""]
    errors = [[part, value["error"]] for part, value in speed["parts"].items() if "error" in value]
    if errors:
        lines += ["Could not be measured:", ""] + _table(["part", "error"], errors)
    peaks = speed["parts"]["matmul_peak"].get("result") or {}
    if peaks:
        lines += ["Dense matmul peak (measured): " + ", ".join(f"{dtype} {rate / 1e12:.2f} TFLOP/s"
                                                             for dtype, rate in peaks.items()), ""]
    steps = speed["parts"]["train_step"].get("result") or {}
    if steps:
        rows = []
        for arch, r in steps.items():
            tried = ", ".join(f"{batch}: {f['images_per_second']:.1f}" if "images_per_second" in f else f"{batch}: OOM"
                              for batch, f in r["batch_sizes"].items())
            rows.append([arch, str(r["batch_size"]), f"{r['images_per_second']:.1f}", f"{100 * r['mfu']:.1f}%",
                         _gib(r["peak_device_bytes"]), tried])
        description = next(iter(steps.values()))["description"]
        lines += [f"Training step at {speed['image_size']} px, synthetic batches on the device ({description}):", ""]
        lines += _table(["arch", "best batch", "img/s", "MFU", "peak device memory", "img/s per batch size"], rows)
    evaluation = speed["parts"]["evaluation"].get("result") or {}
    if evaluation:
        lines += ["Evaluation (main.py's validation loop, synthetic batches):", ""]
        lines += _table(["arch", "batch", "img/s", "peak device memory"],
                        [[arch, str(r["batch_size"]), f"{r['images_per_second']:.1f}", _gib(r["peak_device_bytes"])]
                         for arch, r in evaluation.items()])
    e2e = speed["parts"]["end_to_end"].get("result")
    if e2e:
        cost = (f"the input pipeline costs {100 * (1 - e2e['ratio']):.1f}%" if e2e["ratio"] < 1
                else "no measurable input pipeline cost")
        lines += [f"End to end, main.py -a {e2e['arch']} -b {e2e['batch_size']} --max-steps {e2e['steps']} "
                  f"{' '.join(e2e['flags'])}: JPEG {e2e['jpeg']['fps']:.1f} img/s, synthetic "
                  f"{e2e['synthetic']['fps']:.1f} img/s, ratio {e2e['ratio']:.3f} ({cost})", ""]
    loader = speed["parts"]["loader"].get("result")
    if loader:
        lines += ["DataLoader to the device (ours; the torchvision classic pipeline for comparison):", ""]
        lines += _table(["workers", "img/s", "classic img/s"],
                        [[str(r["workers"]), f"{r['images_per_second']:.1f}", f"{r['baseline_images_per_second']:.1f}"]
                         for r in loader])
    return lines


def _budget_section(budget: dict[str, dict[str, float]], budget_for: str) -> list[str]:
    rows = [[part, f"{b['planned_seconds']:.0f}" if b.get("planned_seconds") is not None else "-",
             f"{b['seconds']:.0f}"] for part, b in budget.items()]
    title = f"planned s ({budget_for})" if budget_for else "planned s"
    return ["## Time", ""] + _table(["part", title, "spent s"], rows)


def markdown(report: dict[str, Any]) -> str:
    head = report["acceptance"]
    verdict = "PASSED" if head["passed"] else "FAILED"
    lines = [f"# Acceptance report: {verdict}", "",
             f"`{head['command']}`, {head['mode']} mode, {head['started_at']}, {head['seconds']:.0f} s in all.", ""]
    lines += _machine_section(report["machine"])
    lines += _correctness_section(report["correctness"])
    lines += speed_section(report["speed"])
    lines += _budget_section(report["budget"], head["budget_for"])
    return "\n".join(lines).rstrip() + "\n"
