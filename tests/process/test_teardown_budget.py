"""A teardown() inside main shares the shutdown's budgets: close_timeout bounds it, 75 says it failed.

A worker that tears its state down itself while the store is blocked (a
PostgreSQL lock, a SQLite file another process holds) ends within
close_timeout plus the grace, with EXIT_NOT_PERSISTED and a log line naming the
store and key, not after the store's own retry budget with a traceback.
Real processes, on asyncio and trio.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BACKENDS

from recoverable_state.events import EXIT_NOT_PERSISTED

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]

CLOSE_TIMEOUT = 2.0
GRACE = 2.0  # the watchdog's
SLACK = 2.5  # interpreter start-up and exit on a busy machine

WORKER = textwrap.dedent(
    """
    import sys

    from pydantic import BaseModel

    import recoverable_state
    from recoverable_state import RecoverableState


    class Progress(BaseModel):
        done: int = 0


    async def main() -> None:
        state = RecoverableState(default_state=Progress(), persist_state_key="p", persistence_enabled=True)
        value = await state.initialize()
        await state.persist_state()
        value.done = 5
        print("READY", flush=True)
        sys.stdin.readline()  # the test holds the store now
        await state.teardown()
        print("UNREACHABLE", flush=True)


    recoverable_state.run(main, backend=sys.argv[1], close_timeout=float(sys.argv[2]))
    """
)


def start(tmp_path: Path, backend: str, storage_url: str) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        "PATH": "/usr/bin:/bin",
        "RECOVERABLE_STATE_STORAGE_URL": storage_url,
        "RECOVERABLE_STATE_STORAGE_RETRY_TIMEOUT": "20",  # longer than close_timeout on purpose
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), backend, str(CLOSE_TIMEOUT)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read() if proc.stderr else ""
    return proc


def finish(proc: subprocess.Popen[str]) -> tuple[int, float, str, str]:
    """Let the worker tear down; its exit code, how long it took, its stdout and stderr."""
    assert proc.stdin is not None
    began = time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=CLOSE_TIMEOUT + GRACE + 40)
    return proc.returncode, time.monotonic() - began, out, err


@pytest.fixture
def locked_postgres(postgres_url: str) -> Iterator[str]:
    from servers import flush_postgres

    flush_postgres(postgres_url)
    yield postgres_url
    flush_postgres(postgres_url)


def test_teardown_in_main_while_postgresql_is_locked_exits_75_within_the_close_timeout(
    backend: str, tmp_path: Path, locked_postgres: str
) -> None:
    import psycopg

    proc = start(tmp_path, backend, locked_postgres)
    try:
        with psycopg.connect(locked_postgres) as lock:
            lock.execute("LOCK TABLE recoverable_state.records IN ACCESS EXCLUSIVE MODE")
            code, took, out, err = finish(proc)
            lock.rollback()
    finally:
        proc.kill()
    assert code == EXIT_NOT_PERSISTED, err
    assert took < CLOSE_TIMEOUT + GRACE + SLACK, err
    assert "UNREACHABLE" not in out
    assert "store 'default', key 'p'" in err
    assert "Traceback" not in err
