"""The main.py command lines of the ModelZoo launch scripts, and how the tests replay them.

``extract`` reads them from the upstream scripts (``../shared/upstream``, beside the
repository); ``tests/data/upstream_commands.jsonl`` keeps the extraction so the tests need
no upstream copy, and a test checks that the two agree. ``replay`` makes one line runnable
here: the script's variables get values, the paths point at the test's data, and what a
CPU box cannot have (the NPU, HCCL, eight devices, a fixed port) is swapped.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream"
FIXTURE = Path(__file__).resolve().parent / "data" / "upstream_commands.jsonl"
_ENTRY = re.compile(r"(?:taskset -c \S+ |nohup )?python3 (?:-u )?(\./)?(main(?:-8p)?\.py)\b")


@dataclass(frozen=True)
class UpstreamCommand:
    script: str  # e.g. InceptionV3_ID1596_for_PyTorch/test/train_full_8p.sh
    command: str  # the main.py line as the script writes it, variables unexpanded
    defaults: dict  # the script's own values of its variables (batch_size=..., learning_rate=...)

    @property
    def per_device_loop(self) -> bool:
        """Started once per device by a shell loop (``--gpu=${i}``), ModelZoo's 8p style."""
        return "${i}" in self.command


def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\\n", " ", text).splitlines()


def _defaults(text: str) -> dict:
    return dict(re.findall(r"^(\w+)=([^\s$`(][^\s]*)\s*$", text, flags=re.MULTILINE))


def extract(root: Path = UPSTREAM) -> list[UpstreamCommand]:
    """Every distinct main.py (or main-8p.py) line of the upstream test scripts."""
    found: dict[tuple[str, str], UpstreamCommand] = {}
    for script in sorted(root.glob("*/test/*.sh")):
        text = script.read_text(encoding="utf-8")
        for line in _logical_lines(text):
            match = _ENTRY.search(line)
            if not match:
                continue
            command = re.sub(r"\s+", " ", line[match.start():].split(" > ")[0].split(">")[0]).strip()
            command = re.sub(r"^(taskset -c \S+ |nohup )", "", command)
            name = str(script.relative_to(root))
            found.setdefault((name, command), UpstreamCommand(name, command, _defaults(text)))
    return list(found.values())


def load_fixture() -> list[UpstreamCommand]:
    return [UpstreamCommand(**json.loads(line)) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def write_fixture(commands: list[UpstreamCommand]) -> None:
    FIXTURE.write_text("".join(json.dumps(vars(c), ensure_ascii=False) + "\n" for c in commands), encoding="utf-8")


def replay(entry: UpstreamCommand, values: dict[str, str], port: int) -> list[str]:
    """``entry``'s argument list (after the script name) with ``values`` for its variables,
    on the CPU with gloo and ``port``. Values not given take the script's defaults."""
    text = entry.command
    text = text.replace("$(hostname -I |awk '{print $1}')", "127.0.0.1")
    variables = {**entry.defaults, **values}
    text = re.sub(r"\$\{?(\w+)\}?", lambda m: str(variables.get(m.group(1), m.group(0))), text)
    text = re.sub(r"--device[= ]'?npu'?", "--device=cpu", text)
    text = re.sub(r"--dist-backend[= ]'?hccl'?", "--dist-backend=gloo", text)
    text = re.sub(r"tcp://127\.0\.0\.1:\d+", f"tcp://127.0.0.1:{port}", text)
    if "$" in text:
        raise ValueError(f"unresolved variable in {entry.script}: {text}")
    words = shlex.split(text)
    script = next(index for index, word in enumerate(words) if re.search(r"main(-8p)?\.py$", word))
    return words[script + 1:]  # after `python3 [-u] ./main.py`
