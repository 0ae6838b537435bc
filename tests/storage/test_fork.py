"""fork() while a backend is busy: the child's stores work, or fail at once, never hang.

The parent is a real process (fork_worker.py) whose writer threads are
inside transactions, or stuck in SQLite's busy wait, when it forks eight
children; each child runs its own event loop (asyncio or trio) on the backend
it inherited.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from recoverable_state import KeyValueStore
from recoverable_state.storage import open_backend

WORKER = Path(__file__).with_name("fork_worker.py")
CHILDREN = 8
LOOPS = ["asyncio", "trio"]


def storage_url(kind: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite3'}" if kind == "sqlite" else f"file://{tmp_path / 'files'}"


def fork_run(url: str, mode: str, loop: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(WORKER), url, mode, str(CHILDREN), loop, loop],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PARENT ok" in lines, done.stdout + done.stderr
    return [line for line in lines if line.startswith("CHILD")]


async def stored_children(url: str) -> list[int]:
    async with open_backend(url) as backend:
        found = []
        kvs = await KeyValueStore.open(name="parent", storage=backend)
        for n in range(CHILDREN):
            value = await kvs.get_value(f"child-{n}")
            if value is not None:
                found.append(value["child"])
        return found


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", ["busy", "thread"])
@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_children_forked_while_the_parent_writes_use_the_backend_they_inherit(
    tmp_path: Path, kind: str, mode: str, loop: str
) -> None:
    # `busy`: multiprocessing's fork from the loop thread; `thread`: os.fork() from a plain thread.
    url = storage_url(kind, tmp_path)
    lines = fork_run(url, mode, loop)
    ok = [re.fullmatch(r"CHILD (\d+) ok \d+\.\d+", line) for line in lines]
    assert all(ok) and sorted(int(m[1]) for m in ok if m) == list(range(CHILDREN)), lines
    assert sorted(anyio.run(stored_children, url)) == list(range(CHILDREN))


@pytest.mark.parametrize("loop", LOOPS)
def test_children_forked_during_a_stuck_transaction_fail_at_once_with_a_clear_error(
    tmp_path: Path, loop: str
) -> None:
    # The parent's write waits on a database another connection holds (BEGIN EXCLUSIVE), with
    # the backend's lock and a group-commit batch, when each child is forked.
    lines = fork_run(storage_url("sqlite", tmp_path), "locked", loop)
    assert len(lines) == CHILDREN, lines
    for line in lines:
        found = re.fullmatch(r"CHILD \d+ error StorageError: (.*) \((\d+\.\d+)\)", line)
        assert found, line
        assert "forked while a transaction of its parent" in found[1]
        assert "state.sqlite3" in found[1]
        assert float(found[2]) < 1.0  # at once: no busy wait, no lock held by a thread not here
