"""Device decisions at the boundary that matters, without an NPU: the capability table's rows,
what they make of the options, torch_npu's import failures, scaler states across devices,
and HCCL's collective dtypes enforced on gloo."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from conftest import REPO, TINY_IMAGE_SIZE
from models.preprocess import Normalizer
from torch_npu_scaler import TorchNpuStyleScaler
from training import device as devices
from training import distributed
from training.config import resolve_options
from training.data.device_loader import DeviceLoader
from training.device import CAPABILITIES, HCCL_DTYPES, DeviceError
from training.distributed import CollectiveDtypeError, Topology
from training.options import parse_command_line
from training.precision import ScaledFp16, adapt_scaler_state, build_precision
from training.setup import SetupError, build_data, build_model, decide

NPU = CAPABILITIES["npu"]


def resolved(*argv: str):
    command = parse_command_line(list(argv))
    return resolve_options(command.args, command.explicit, 1).args


# -- the table --------------------------------------------------------------------------------

def test_npu_row_is_what_torch_npu_accepts():
    assert NPU.dist_backend == "hccl" and NPU.default_amp_dtype == torch.float16
    assert NPU.channels_last is False  # torch_npu: "Only contiguous_format or preserve_format is supported"
    assert NPU.collective_dtypes == {torch.int8, torch.int16, torch.int32, torch.int64,
                                     torch.float16, torch.bfloat16, torch.float32}
    assert not {torch.float64, torch.bool, torch.uint8} & NPU.collective_dtypes
    assert NPU.pin_memory_device == "npu" and NPU.vendor_fused_sgd and NPU.sync_batchnorm
    assert NPU.side_stream_prefetch is False


def test_other_rows():
    cuda, cpu = CAPABILITIES["cuda"], CAPABILITIES["cpu"]
    assert (cuda.dist_backend, cuda.optimizer_kernel, cuda.pin_memory_device, cuda.side_stream_prefetch) == (
        "nccl", "fused", "cuda", True)
    assert (cpu.dist_backend, cpu.channels_last, cpu.pin_memory_device, cpu.sync_batchnorm) == (
        "gloo", True, None, False)
    assert cpu.default_amp_dtype == torch.bfloat16 and not cpu.vendor_fused_sgd
    assert devices.capabilities("cpu") is cpu


@pytest.mark.parametrize("version, torchair, triton, expected", [
    ("2.1.0.post3", True, False, "npu"),
    ("2.5.1", False, True, None),  # no NPU code generation in inductor before torch_npu 2.6
    ("2.6.0", False, True, "inductor"),
    ("2.10.0rc1", False, True, "inductor"),  # compared as numbers: 2.10 > 2.6
    ("2.7.1", False, False, None),
])
def test_npu_compile_backend(version, torchair, triton, expected):
    backend, reason = devices.npu_compile_backend(version, torchair, triton)
    assert backend == expected
    assert (reason == "") == (expected is not None)
    if expected is None:
        assert version in reason and "torchair" in reason


def test_versions_compare_as_numbers():
    assert devices.version_tuple("2.10.0+cpu") > devices.version_tuple("2.9.1") > devices.version_tuple("2.9")
    assert devices.version_tuple("2.5.1.post3") == (2, 5, 1)


def test_pinned_memory_options_follow_the_torch_version():
    assert devices.pin_memory_options(NPU, "2.5.1") == {"pin_memory": True, "pin_memory_device": "npu"}
    assert devices.pin_memory_options(NPU, "2.6.0") == {"pin_memory": True}
    assert devices.pin_memory_options(CAPABILITIES["cpu"], "2.5.1") == {"pin_memory": False}


# -- what the table makes of the options ----------------------------------------------------------

def test_npu_turns_channels_last_off_and_says_so():
    decisions = decide(resolved("--dummy"), NPU, Topology())
    assert decisions.channels_last is False
    assert decisions.notes == ("channels_last is off on npu: its tensors accept the contiguous memory format only",)
    assert decide(resolved("--dummy"), CAPABILITIES["cpu"], Topology()).channels_last is True
    assert decide(resolved("--dummy", "--no-channels-last"), NPU, Topology()).notes == ()


def test_npu_refuses_compile_without_a_backend_and_fused_sgd_elsewhere():
    no_backend = replace(NPU, compile_backend=None, compile_refusal="torch_npu 2.5.1 has no torch.compile backend",
                         compile_backend_from_install=False)
    with pytest.raises(SetupError, match="--compile on npu: torch_npu 2.5.1 has no torch.compile backend"):
        decide(resolved("--dummy", "--compile"), no_backend, Topology())
    with_torchair = replace(NPU, compile_backend="npu", compile_backend_from_install=False)
    assert decide(resolved("--dummy", "--compile"), with_torchair, Topology()).compile_backend == "npu"
    with pytest.raises(SetupError, match="--npu-fused-sgd needs an NPU"):
        decide(resolved("--dummy", "--npu-fused-sgd"), CAPABILITIES["cpu"], Topology())
    with pytest.raises(SetupError, match="SyncBatchNorm has no cpu"):
        decide(resolved("--dummy", "--sync-bn"), CAPABILITIES["cpu"], Topology(0, 2, 0, 2))


def test_models_and_batches_stay_contiguous_where_the_table_says_so(tiny_data):
    """The NPU row's decisions, carried out on the CPU: no channels-last tensor anywhere."""
    args = resolved("-a", "xception", "--data", str(tiny_data), "--image-size", str(TINY_IMAGE_SIZE), "-b", "4",
                    "-j", "0", "--seed", "0")
    cpu = torch.device("cpu")
    for row, channels_last in ((NPU, False), (CAPABILITIES["cpu"], True)):
        # No NPU here to pin memory for: the formats are what this test is about.
        decisions = replace(decide(args, row, Topology()), pin_memory={"pin_memory": False})
        spec = models.model_spec("xception")
        loaders = build_data(args, spec, Topology(), cpu, decisions, seed=0)
        images, _, _ = next(iter(loaders.train))
        model = build_model(args, spec, 3, cpu, decisions, Topology()).model
        weight = model.conv1.weight
        assert images.is_contiguous() is not channels_last
        assert images.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert weight.is_contiguous() is not channels_last


# -- torch_npu: missing, broken, present -------------------------------------------------------------

def _fake_plugin(tmp_path, body: str):
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(body)
    return tmp_path


@pytest.fixture
def fresh_plugin_state(monkeypatch):
    devices.import_torch_npu.cache_clear()
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    yield
    devices.import_torch_npu.cache_clear()


def test_missing_torch_npu_means_no_npu(fresh_plugin_state):
    assert devices.import_torch_npu() is None
    assert devices.select_device("auto").type != "npu"
    with pytest.raises(DeviceError, match="--device npu asked for, but torch_npu is not installed"):
        devices.select_device("npu")


@pytest.mark.parametrize("body, text", [
    ("raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')", "libhccl.so"),
    ("import yaml_that_is_not_installed", "yaml_that_is_not_installed"),
    ("raise RuntimeError('CANN version mismatch')", "CANN version mismatch"),
])
def test_broken_torch_npu_fails_loudly(body, text, tmp_path, monkeypatch, fresh_plugin_state):
    monkeypatch.syspath_prepend(str(_fake_plugin(tmp_path, body)))
    with pytest.raises(DeviceError, match=f"torch_npu is installed but cannot be imported: .*{text}"):
        devices.select_device("auto")
    assert devices.select_device("cpu").type == "cpu"  # an explicit CPU run never imports it


def test_broken_torch_npu_stops_main_with_its_error(tmp_path):
    """The user's view: --device auto with a broken CANN does not quietly train on the CPU."""
    plugin = _fake_plugin(tmp_path, "raise ImportError('libhccl.so: cannot open shared object file')")
    result = subprocess.run([sys.executable, "main.py", "--dummy", "--epochs", "1", "--output_dir",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(plugin)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: torch_npu is installed but cannot be imported: ImportError: libhccl.so" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_an_autoloaded_torch_npu_is_used(tmp_path, monkeypatch, fresh_plugin_state):
    """torch_npu >= 2.5.1 is imported by `import torch` itself: it is taken from sys.modules."""
    loaded = type(sys)("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", loaded)
    assert devices.import_torch_npu() is loaded


class Lookups:
    """A finder that notes every top-level module looked up, and finds nothing itself."""

    def __init__(self):
        self.names: list[str] = []

    def find_spec(self, name, path=None, target=None):
        self.names.append(name)
        return None


def test_torchair_is_imported_for_compile_only(tmp_path, monkeypatch, fresh_plugin_state):
    """A broken torchair stops a --compile run with one line, and no other run looks it up."""
    plugins = _fake_plugin(tmp_path, "__version__ = '2.5.1'")
    (plugins / "torchair").mkdir()
    (plugins / "torchair" / "__init__.py").write_text("raise ImportError('libge_runner.so: cannot open shared object')")
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.delitem(sys.modules, "torchair", raising=False)
    lookups = Lookups()
    monkeypatch.setattr(sys, "meta_path", [lookups, *sys.meta_path])
    caps = devices.capabilities("npu")
    assert decide(resolved("--dummy"), caps, Topology()).compile_backend is None
    assert "torchair" not in lookups.names
    with pytest.raises(DeviceError, match="^torchair is installed but cannot be imported: ImportError: libge_runner"):
        decide(resolved("--dummy", "--compile"), caps, Topology())


def test_gpu_means_cuda():
    assert devices.canonical_type("gpu") == "cuda"
    assert parse_command_line(["--dummy", "--device", "gpu"]).args.device == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cuda asked for"):
            devices.select_device("gpu")


# -- loss-scaler states across devices -----------------------------------------------------------

def test_scaler_states_load_across_formats():
    cuda_style = torch.amp.GradScaler("cpu", init_scale=512.0).state_dict()
    with pytest.raises(KeyError):
        TorchNpuStyleScaler().load_state_dict(cuda_style)  # what a GPU checkpoint does to torch_npu
    npu = ScaledFp16("cpu", TorchNpuStyleScaler())
    npu.load_state_dict(cuda_style)
    assert npu.scaler._dynamic is True and npu.scaler.get_scale() == 512.0
    plain = ScaledFp16("cpu", torch.amp.GradScaler("cpu"))
    plain.load_state_dict(npu.state_dict())  # and back: the NPU file on a GPU or CPU
    assert plain.scaler.get_scale() == 512.0


def test_a_static_scale_keeps_this_runs_value():
    saved = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 3, "dynamic": True}
    adapted = adapt_scaler_state(saved, ("scale", "growth_factor", "backoff_factor", "growth_interval",
                                         "_growth_tracker"), static_scale=128.0)
    assert adapted["scale"] == 128.0 and "dynamic" not in adapted
    precision = build_precision("cpu", amp=True, amp_dtype="float16", loss_scale="128")
    precision.load_state_dict(saved)
    assert precision.scaler.get_scale() == 128.0 and precision.state_dict()["dynamic"] is True


# -- copies to the device ------------------------------------------------------------------------

class CopyFlags(TorchDispatchMode):
    """The ``non_blocking`` flag of every copy to another device."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device", args[0].device) != args[0].device:
            self.non_blocking.append(kwargs.get("non_blocking", False))
        return func(*args, **kwargs)


def test_batches_from_pageable_memory_are_copied_blocking():
    """MPS has no pinned memory, and a non-blocking copy from pageable memory can hand it a
    corrupted batch. (The meta device stands in for the accelerator: the copy is dispatched,
    its flag recorded.)"""
    batch = (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), [])
    loader = DeviceLoader([batch, batch], "meta", Normalizer((0.5,) * 3, (0.5,) * 3, "meta"), channels_last=False)
    with CopyFlags() as copies:
        images = [images for images, _, _ in loader]
    assert images[0].device.type == "meta"
    assert copies.non_blocking == [False] * 4


# -- collectives as strict as HCCL ----------------------------------------------------------------

@pytest.fixture
def restore_collective_rules():
    yield
    distributed.init_process_group(Topology(), "gloo", torch.device("cpu"), 60, None)


def test_strict_collectives_reject_what_hccl_rejects(monkeypatch, restore_collective_rules):
    monkeypatch.setenv("STRICT_COLLECTIVES", "hccl")
    distributed.init_process_group(Topology(), "gloo", torch.device("cpu"), 60, None)
    for dtype in (torch.float64, torch.bool, torch.uint8):
        with pytest.raises(CollectiveDtypeError, match="accepts only"):
            distributed.sum_across_ranks(torch.zeros(2, dtype=dtype))
    for dtype in sorted(HCCL_DTYPES, key=str):
        distributed.sum_across_ranks(torch.zeros(2, dtype=dtype))
    monkeypatch.delenv("STRICT_COLLECTIVES")
    distributed.init_process_group(Topology(), "gloo", torch.device("cpu"), 60, None)
    distributed.sum_across_ranks(torch.zeros(2, dtype=torch.float64))  # gloo itself takes it
    distributed.init_process_group(Topology(), "hccl", torch.device("cpu"), 60, NPU.collective_dtypes)
    with pytest.raises(CollectiveDtypeError):
        distributed.sum_across_ranks(torch.zeros(2, dtype=torch.float64))  # the NPU row, without the variable
