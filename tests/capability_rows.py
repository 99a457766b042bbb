"""main.py's run on this CPU under another device's capability row.

torch has CPU kernels for several things the CUDA and NPU rows decide (fused SGD, GradScaler,
the optimizer kernel torch picks by itself), so those code paths run here when the CPU is
given that row: ``replace(CAPABILITIES["cpu"], optimizer_kernel="fused")`` is CUDA's choice.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import replace

import torch

from conftest import Result
from models.errors import UserError
from training.device import CAPABILITIES, Capabilities
from training.distributed import Topology
from training.metrics import setup_logging
from training.options import parse_command_line
from training.run import Run

FUSED_CPU = replace(CAPABILITIES["cpu"], optimizer_kernel="fused")  # CUDA's optimizer choice
TORCH_DECIDES_CPU = replace(CAPABILITIES["cpu"], optimizer_kernel="auto")  # the NPU's (and MPS's)


def run_main_with_row(row: Capabilities, *argv: object) -> Result:
    """Run ``main.py argv`` in this process on the CPU, deciding with ``row``."""
    command = parse_command_line([str(a) for a in argv])
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        setup_logging(0, 1)
        try:
            Run(command, Topology(), torch.device("cpu"), row).execute()
            code = 0
        except UserError as error:
            logging.getLogger(__name__).error("error: %s", error)
            code = 1
    return Result(code, buffer.getvalue())
