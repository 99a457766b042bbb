"""The README's promises: its two commands are what CI runs, and it documents every option."""
from __future__ import annotations

import re

from conftest import REPO
from training.options import build_parser

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_starts_with_the_two_commands_ci_runs():
    commands = re.findall(r"^(bash \S+)", README.split("## Contents")[0], flags=re.MULTILINE)
    assert commands == ["bash quickstart.sh", "bash run_tests.sh"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^bash run_tests\.sh$", ci, flags=re.MULTILINE)
    for script in ("quickstart.sh", "run_tests.sh"):
        assert (REPO / script).is_file()


def test_quickstart_runs_main_on_the_embedded_data():
    quickstart = (REPO / "quickstart.sh").read_text(encoding="utf-8")
    assert "main.py" in quickstart and "--dummy" in quickstart and "demo.py" in quickstart


def test_every_main_option_is_documented():
    options = [o for action in build_parser()._actions for o in action.option_strings if o not in ("-h", "--help")]
    missing = [o for o in options if f"`{o}`" not in README]
    assert not missing, f"README does not document: {missing}"
