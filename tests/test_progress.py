"""Progress on a terminal: tqdm bars with a percentage, a rate and the time left, checked in a real
pseudo-terminal; the ModelZoo log lines wherever stdout is not one (tests/test_scripts.py)."""
from __future__ import annotations

import re
import sys

from processes import main_command, run_in_terminal

# tqdm's "<description>:  67%|######    | 2/3 [00:11<00:05,  5.48s/step, loss=...]"
BAR = re.compile(r"(?P<task>[\w -]+?): +(?P<percent>\d+)%\|[^|]*\| *(?P<done>\d+)/(?P<total>\d+) "
                 r"\[(?P<elapsed>\d\d:\d\d)<(?P<left>\d\d:\d\d|\?), +(?P<rate>[\d.]+ ?(?:s/)?[a-z]+(?:/s)?)")


def test_a_terminal_shows_bars_with_percentage_rate_and_time_left(tmp_path):
    # One loader worker: the process must also exit with its workers alive until the end (a draw of
    # curves.png once pinned the training frames, and the exit waited for a worker forever).
    command = main_command("-a", "xception", "--dummy", "--dummy-dir", tmp_path / "cache", "--output_dir",
                           tmp_path / "out", "--image-size", "48", "-b", "8", "-j", "1", "--epochs", "1",
                           "--max-steps", "3", "--print-freq", "1", "--seed", "0")
    code, output = run_in_terminal(command, timeout=240)
    assert code == 0, output
    states = [match.groupdict() for match in BAR.finditer(output)]
    for task in ("generating the --dummy data set", "Epoch 0", "Test"):
        finished = [state for state in states if state["task"].endswith(task) and state["percent"] == "100"]
        assert finished, f"no finished bar for {task!r} in:\n{output[-3000:]}"
        assert all(state["done"] == state["total"] for state in finished)
    epoch = [state for state in states if state["task"].endswith("Epoch 0")]
    assert {state["total"] for state in epoch} == {"3"}
    # Every bar has the time-left field (BAR); it holds a time once tqdm knows a rate, '?' before
    # (also on a bar that ends before its first timed update: which do depends on the machine).
    assert any(state["left"] != "?" for state in states)
    assert any(state["percent"] not in ("0", "100") for state in states)  # drawn while running, with a rate
    assert "loss=" in output  # the running loss next to the bar
    # The bar replaces the per-step lines; the summaries ModelZoo's parsers read stay.
    assert "Epoch: [0][" not in output and "Test: [" not in output
    for line in ("Epoch: [0] summary  Loss ", "[cpu id: 0 ] * FPS@all ", " * Acc@1 "):
        assert line in output, line


def test_a_reader_that_goes_away_stops_neither_the_run_nor_floods_stderr(tiny_data, tmp_path):
    """``main.py | head``: the run goes on and saves, with one warning; ``demo.py | head`` ends
    quietly with SIGPIPE's status. Before, every later log line printed a logging traceback."""
    import subprocess

    from conftest import quick_args
    from processes import REPO

    output = tmp_path / "out"
    run = subprocess.Popen(main_command(*quick_args(tiny_data, output, "xception", "--max-steps", "2", "-b", "2")),
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline().startswith("network: xception")
    run.stdout.close()  # as head does after its lines
    errors = run.stderr.read()
    assert run.wait(timeout=300) == 0, errors
    assert errors.splitlines() == ["warning: the console's reader went away (broken pipe): the run goes on, its log "
                                   "lines go nowhere now; metrics.jsonl has its figures"]
    assert (output / "checkpoint.pth.tar").is_file() and (output / "metrics.jsonl").read_text().strip()

    many = tmp_path / "many"
    many.mkdir()
    for index, image in enumerate(sorted((tiny_data / "val").rglob("*.jpg"))[:12]):
        (many / f"{index:02d}.jpg").write_bytes(image.read_bytes())
    demo = subprocess.Popen([sys.executable, "demo.py", "--checkpoint", str(output / "checkpoint.pth.tar"), "--image",
                             str(many), "-j", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert demo.stdout.readline().startswith("checkpoint: ")
    demo.stdout.close()
    errors = demo.stderr.read()
    assert demo.wait(timeout=300) == 141 and "Traceback" not in errors, errors
