"""A SQLite database another process holds: the command fails within --timeout and says so."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import Cli

HOLD = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("LOCKED", flush=True)
sys.stdin.read()  # until the test closes our stdin
conn.execute("ROLLBACK")
"""


@pytest.fixture
def held(filled_url: str) -> Iterator[Path]:
    """The filled database, with a transaction of another process holding it (BEGIN EXCLUSIVE)."""
    path = Path(filled_url.removeprefix("sqlite:///"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "LOCKED"
        yield path
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.parametrize("command", [("delete", "crawler", "--yes"), ("reset", "crawler", "--yes")])
def test_a_write_on_a_database_another_process_holds_fails_within_the_timeout(
    cli: Cli, filled_url: str, held: Path, command: tuple[str, ...]
) -> None:
    started = time.monotonic()
    done = cli("--timeout", "1", *command, url=filled_url)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "another process holds the SQLite database" in done.stderr, done.stderr
    assert str(held) in done.stderr
    assert "after 1 s of waiting" in done.stderr
    # SQLite's own wait is 30 s; the command (an interpreter starting included) ends well before.
    assert elapsed < 12, elapsed


def test_the_record_is_untouched_and_the_command_works_once_the_other_process_is_done(
    cli: Cli, filled_url: str
) -> None:
    path = Path(filled_url.removeprefix("sqlite:///"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "LOCKED"
    refused = cli("--timeout", "0.5", "delete", "crawler", "--yes", url=filled_url)
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(10)
    assert refused.returncode != 0
    assert "deleted key 'crawler'" in cli.ok("delete", "crawler", "--yes", url=filled_url)
