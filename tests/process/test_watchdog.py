"""The exit watchdog stands down when a program catches the SystemExit and goes on.

With on_signal="exit" a watchdog thread guards the way out after a signal (it
ends a process that a stuck thread keeps alive). A program that catches the
SystemExit and carries on past the deadline must not be killed later, when it
finally exits on its own.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import BACKENDS

pytestmark = pytest.mark.slow

PROGRAM = """
import os, signal, sys, threading, time
from datetime import timedelta
import anyio
from recoverable_state import EventManager

async def main():
    try:
        async with EventManager(handle_signals=True, close_timeout=timedelta(seconds=0.2)):
            os.kill(os.getpid(), signal.SIGTERM)
            await anyio.sleep(10)
    except SystemExit as exc:
        print("caught", exc.code, flush=True)

anyio.run(main, backend=sys.argv[1])
time.sleep(2.6)  # past the watchdog's deadline (0.2 s timeout + 2 s)
# A thread that outlives the main thread: a watchdog still on guard would end the
# process 2 s after the main thread, with 143.
threading.Thread(target=time.sleep, args=(2.5,)).start()
print("main done", flush=True)
"""


def test_a_program_that_catches_the_system_exit_is_left_alone(tmp_path: Path) -> None:
    script = tmp_path / "catch.py"
    script.write_text(PROGRAM)
    started = time.monotonic()
    procs = {
        backend: subprocess.Popen(
            [sys.executable, str(script), backend],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for backend in BACKENDS
    }
    for backend, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (backend, out, err)
        assert out.split("\n")[:2] == [f"caught {128 + signal.SIGTERM}", "main done"], (backend, out, err)
        assert "ending" not in err
    assert time.monotonic() - started >= 5.0  # both ran to their own end
