"""A child forked inside its parent's event manager: it may enter that manager in a loop of its own,
and it never saves the parent's states (which would fence the parent off)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fork_manager_worker.py")
CHILDREN = 8


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_children_forked_inside_the_manager_use_it_and_leave_the_parents_states_alone(
    tmp_path: Path, loop: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECOVERABLE_STATE_")}
    env["RECOVERABLE_STATE_STORAGE_URL"] = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    done = subprocess.run(
        [sys.executable, str(WORKER), loop, str(CHILDREN)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(line for line in lines if line.startswith("CHILD")) == sorted(
        f"CHILD {n} {{'n': {100 + n}}}" for n in range(CHILDREN)
    ), done.stdout + done.stderr
    # The parent's last save landed: no child saved (and so claimed) its state.
    assert lines[-1] == "PARENT {'n': 1000}", done.stdout + done.stderr
    assert "StateOwnershipLost" not in done.stderr
