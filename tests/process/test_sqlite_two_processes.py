"""Two processes on one SQLite file: different keys both persist; on one key the later one fences."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from recoverable_state import KeyValueStore, open_backend

WORKER = Path(__file__).with_name("sqlite_pair_worker.py")
LOOPS = ["asyncio", "trio"]


def start(db: Path, key: str, loop: str, mode: str, rounds: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(db), key, loop, mode, str(rounds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stored(db: Path, key: str) -> object:
    async def read() -> object:
        async with open_backend(f"sqlite:///{db}") as backend:
            return await (await KeyValueStore.open(name="pair", storage=backend)).get_value(key)

    return anyio.run(read)


@pytest.mark.parametrize("loop", LOOPS)
def test_two_processes_on_different_keys_both_persist_every_time(tmp_path: Path, loop: str) -> None:
    db = tmp_path / "state.sqlite3"
    procs = [start(db, key, loop, "loop", 300) for key in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.split("\n")[:2] == ["LOADED 0", "DONE 300"], out + err
    assert stored(db, "a") == {"n": 300}
    assert stored(db, "b") == {"n": 300}


@pytest.mark.parametrize("loop", LOOPS)
def test_the_process_that_loaded_a_key_later_fences_the_earlier_one(tmp_path: Path, loop: str) -> None:
    db = tmp_path / "state.sqlite3"
    first = start(db, "shared", loop, "wait")
    try:
        assert first.stdout is not None and first.stdin is not None
        assert first.stdout.readline().strip() == "LOADED 0"
        assert first.stdout.readline().strip() == "READY 1"
        # A successor takes the key over: it loads what the first one persisted and goes on.
        second = start(db, "shared", loop, "loop", 10)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert out.split("\n")[:2] == ["LOADED 1", "DONE 11"], out + err
        first.stdin.write("next\n")
        first.stdin.flush()
        answer = first.stdout.readline().strip()
        assert answer.startswith("LOST "), answer
        assert "shared" in answer and "another process" in answer
        first.stdin.close()
        assert first.wait(30) == 0, first.stderr.read() if first.stderr else ""
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert stored(db, "shared") == {"n": 11}  # the stale process wrote nothing more
