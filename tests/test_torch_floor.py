"""requirements.txt's torch floor is true: the runtime code uses only torch names (and call
keywords) that the oldest allowed torch has, or reaches newer ones behind a check.

The list of names torch 2.3 has was written by ``python tests/torch_api.py --write`` under
torch 2.3.1; the whole CPU suite was also run there (docs/PERFORMANCE.md does not depend on it).
"""
from __future__ import annotations

import re

from conftest import REPO
from torch_api import MANIFEST, used_names

# Names the code uses only after checking that the installed torch has them.
GUARDED = {
    "torch.nn.parallel.DistributedDataParallel:forward_sync_buffers":
        ("training/setup.py", r"inspect\.signature\(DistributedDataParallel\.__init__\)"),
    "torch.onnx.export:dynamo": ("pthtar2onnx.py", r"inspect\.signature\(torch\.onnx\.export\)"),
}


def floor_version() -> tuple[int, int]:
    text = (REPO / "requirements.txt").read_text(encoding="utf-8")
    major, minor = re.search(r"^torch>=(\d+)\.(\d+)", text, flags=re.MULTILINE).groups()
    return int(major), int(minor)


def test_the_manifest_is_for_the_floor_of_requirements_txt():
    header = MANIFEST.read_text(encoding="utf-8").splitlines()[0]
    major, minor = re.match(r"# torch (\d+)\.(\d+)\.", header).groups()
    assert (int(major), int(minor)) == floor_version()


def test_the_code_uses_only_what_the_floor_has():
    available = {line for line in MANIFEST.read_text(encoding="utf-8").splitlines() if not line.startswith("#")}
    unknown = sorted(used_names() - available - set(GUARDED))
    assert not unknown, (f"not known to exist in torch {'.'.join(map(str, floor_version()))}: {unknown}; check them "
                         f"under that torch (python tests/torch_api.py --write) or guard them and list them in GUARDED")


def test_guarded_names_sit_behind_their_check():
    for name, (path, check) in GUARDED.items():
        assert re.search(check, (REPO / path).read_text(encoding="utf-8")), (name, path)
    assert set(GUARDED) <= used_names()
