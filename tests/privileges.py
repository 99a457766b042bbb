"""Running a function as an unprivileged user, so that permission bits apply even when the
tests run as root (as CI does)."""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable

NOBODY = 65534


def as_unprivileged_user(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a forked child that drops root to ``nobody`` first (a non-root
    user runs it as itself); returns its result, or the exception it raised."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        try:
            os.close(reader)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                outcome: Any = function(*args)
            except Exception as error:  # handed back to the test as a value
                outcome = error
            with os.fdopen(writer, "wb") as stream:
                pickle.dump(outcome, stream)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as stream:
        data = stream.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)
