"""examples/sync_worker.py does what its docstring says: SIGTERM saves it, the next start resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sync_worker.py"

pytestmark = pytest.mark.slow


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_worker_is_stopped_by_sigterm_and_resumes(tmp_path: Path, backend: str) -> None:
    worker = start(tmp_path, "--delay", "0.02", "--backend", backend)
    assert worker.stdout is not None
    assert worker.stdout.readline().startswith("pid ")
    assert worker.stdout.readline().strip() == "starting from scratch"
    time.sleep(1.0)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=40)
    assert worker.returncode == 143, err
    stopped = int(out.split("stop requested at job ")[1].split(":")[0])
    assert stopped > 1

    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--jobs", "3", "--delay", "0.01", "--backend", backend],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert f"resuming at job {stopped} ({stopped - 1} done" in again.stdout
    assert f"done for now: {stopped + 2} jobs in total" in again.stdout
