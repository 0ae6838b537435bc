"""The examples a newcomer starts first do what their docstrings say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from servers import flush_postgres, flush_redis

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_counter_worker_resumes_where_it_stopped(tmp_path: Path, loop: str) -> None:
    script = str(EXAMPLES / "counter_worker.py")
    first = run([script, "--items", "3", "--delay", "0.01", "--backend", loop], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "starting from scratch" in first.stdout
    second = run([script, "--items", "2", "--delay", "0.01", "--backend", loop], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming after item 3 (item-3)" in second.stdout
    assert "done for now: 5 items in total" in second.stdout


@pytest.mark.parametrize("server", ["redis_server", "postgres_server"])
def test_migration_handover_keeps_the_successors_progress(
    tmp_path: Path, server: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue(server).url)
    (flush_redis if server == "redis_server" else flush_postgres)(url)
    other_host = url.replace("127.0.0.1", "localhost")  # machine B reaches the same server by name
    # B starts 2 s after A; with the default goal (60 items, 3 s of work) a slow start
    # of B on a busy machine lets A finish first and there is no handover to check.
    goal = "100"
    done = run(
        [
            str(EXAMPLES / "migration_handover.py"),
            *("--storage-url", url, "--storage-url-b", other_host, "--goal", goal),
        ],
        tmp_path,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    resumed = re.search(r"\[B\] starting at item (\d+) \(last saved by A\)", done.stdout)
    assert resumed is not None and int(resumed.group(1)) > 0, done.stdout
    assert "[A] 'handover-job' was taken over by another machine" in done.stdout
    assert f"[B] finished the job: {goal} items" in done.stdout


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize(("signum", "code", "note"), [(15, 143, "migrating ("), (2, 130, "aborting (")])
def test_sigterm_worker_prints_whole_lines_in_order(
    tmp_path: Path, loop: str, signum: int, code: int, note: str
) -> None:
    import os

    args = ["--crawls", "3", "--delay", "0.01", "--backend", loop]
    worker = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "sigterm_worker.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    assert worker.stderr is not None
    assert worker.stdout.readline().startswith("pid ")
    os.kill(worker.pid, signum)
    # Read through the same text wrapper as readline did: communicate() would skip what it buffered.
    out, err = worker.stdout.read(), worker.stderr.read()
    assert worker.wait(timeout=60) == code, err
    lines = out.splitlines()
    shapes = (r"starting of crawl-\d", r"(migrating|aborting) \(.*\): saving every crawl", r"stopping at .*")
    assert all(any(re.fullmatch(shape, line) for shape in shapes) for line in lines), lines
    noted = [n for n, line in enumerate(lines) if line.startswith(note)]
    stopped = [n for n, line in enumerate(lines) if line.startswith("stopping at")]
    assert len(noted) == 1 and len(stopped) == 1, lines
    assert noted[0] < stopped[0], lines


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_use_state_worker_resumes_at_the_next_page(tmp_path: Path, loop: str) -> None:
    script = str(EXAMPLES / "use_state_worker.py")
    first = run([script, "--pages", "3", "--delay", "0.01", "--backend", loop], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "starting from scratch" in first.stdout
    second = run([script, "--pages", "2", "--delay", "0.01", "--backend", loop], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming at page 4" in second.stdout
    assert "done for now: 5 pages in total" in second.stdout
