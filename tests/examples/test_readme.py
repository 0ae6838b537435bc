"""The README's worker and the getting-started page's run as pasted: SIGTERM saves, the next start resumes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _worker_snippet(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    section = text.split("## Run a worker", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, f"no python block under 'Run a worker' in {page}"
    return found.group(1)


def test_the_readme_and_the_getting_started_page_show_the_same_worker() -> None:
    assert _worker_snippet(ROOT / "README.md") == _worker_snippet(ROOT / "docs" / "getting-started.md")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_readme_worker_saves_on_a_signal_and_resumes(tmp_path: Path, signum: int) -> None:
    (tmp_path / "worker.py").write_text(_worker_snippet(ROOT / "README.md"), encoding="utf-8")
    counts = []
    for _ in range(2):
        worker = subprocess.Popen(
            [sys.executable, "worker.py"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        first = worker.stdout.readline()
        started = re.fullmatch(r"orders: starting after item (\d+)\n", first)
        assert started is not None, first
        counts.append(int(started.group(1)))
        time.sleep(0.5)  # let it work a few items
        worker.send_signal(signum)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 128 + signum, err
    assert counts[0] == 0
    assert counts[1] > 0  # the first run's progress was saved on the signal
