"""fork() while the SQLite backend is busy: the child's stores work, or fail at once, never hang.

The parent is a real process (sqlite_fork_worker.py) whose writer threads are
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

WORKER = Path(__file__).with_name("sqlite_fork_worker.py")
CHILDREN = 8
LOOPS = ["asyncio", "trio"]


def fork_run(tmp_path: Path, mode: str, loop: str) -> tuple[Path, list[str]]:
    db = tmp_path / "state.sqlite3"
    done = subprocess.run(
        [sys.executable, str(WORKER), str(db), mode, str(CHILDREN), loop, loop],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PARENT ok" in lines, done.stdout + done.stderr
    return db, [line for line in lines if line.startswith("CHILD")]


async def stored_children(db: Path) -> list[int]:
    async with open_backend(f"sqlite:///{db}") as backend:
        found = []
        for n in range(CHILDREN):
            kvs = await KeyValueStore.open(name=f"child-{n}", storage=backend)
            value = await kvs.get_value("value")
            if value is not None:
                found.append(value["child"])
        return found


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", ["busy", "thread"])
def test_children_forked_while_the_parent_writes_use_the_backend_they_inherit(
    tmp_path: Path, mode: str, loop: str
) -> None:
    # `busy`: multiprocessing's fork from the loop thread; `thread`: os.fork() from a plain thread.
    db, lines = fork_run(tmp_path, mode, loop)
    ok = [re.fullmatch(r"CHILD (\d+) ok \d+\.\d+", line) for line in lines]
    assert all(ok) and sorted(int(m[1]) for m in ok if m) == list(range(CHILDREN)), lines
    assert sorted(anyio.run(stored_children, db)) == list(range(CHILDREN))


@pytest.mark.parametrize("loop", LOOPS)
def test_children_forked_during_a_stuck_transaction_fail_at_once_with_a_clear_error(
    tmp_path: Path, loop: str
) -> None:
    # The parent's write waits on a database another connection holds (BEGIN EXCLUSIVE), with
    # the backend's lock and a group-commit batch, when each child is forked.
    _, lines = fork_run(tmp_path, "locked", loop)
    assert len(lines) == CHILDREN, lines
    for line in lines:
        found = re.fullmatch(r"CHILD \d+ error StorageError: (.*) \((\d+\.\d+)\)", line)
        assert found, line
        assert "forked while a transaction of its parent" in found[1]
        assert "state.sqlite3" in found[1]
        assert float(found[2]) < 1.0  # at once: no busy wait, no lock held by a thread not here
