"""Changing records: restore, reset, delete (each asks first unless --yes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import WORKER, Cli, read_all

pytestmark = pytest.mark.slow


def test_restore_writes_a_kept_snapshot_back_as_the_current_record(cli: Cli, filled_url: str) -> None:
    before = read_all(filled_url)
    out = cli.ok("restore", "crawler", "--to", "3", url=filled_url)
    assert "now version 6" in out

    assert json.loads(cli.ok("show", "crawler", url=filled_url))["done"] == 3
    after = read_all(filled_url)
    history = json.loads(cli.ok("history", "crawler", "--json", url=filled_url))
    assert [s["version"] for s in history] == [5, 4, 3]  # the snapshots stay as they were
    assert after[("default", "crawler")][1] == before[("default", "crawler")][1]  # content type kept
    assert {k: v for k, v in after.items() if k != ("default", "crawler")} == {
        k: v for k, v in before.items() if k != ("default", "crawler")
    }


def test_restore_makes_a_running_worker_lose_ownership_of_its_state(cli: Cli, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/held.sqlite3"
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), url, "hold"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdin is not None
        assert worker.stdout.readline() == "ready\n"
        cli.ok("restore", "held", "--to", "1", url=url)
        out, _ = worker.communicate("go\n", timeout=30)
    finally:
        worker.kill()
        worker.wait()
    assert out == "ownership lost\n"
    assert json.loads(cli.ok("show", "held", url=url))["done"] == 1  # the worker's write was refused


def test_delete_asks_first_and_a_no_changes_nothing(cli: Cli, filled_url: str) -> None:
    refused = cli("delete", "notes", input="n\n", url=filled_url)
    assert refused.returncode == 1
    assert "Delete the record under key 'notes'" in refused.stderr
    assert "nothing changed" in refused.stderr
    no_answer = cli("delete", "notes", url=filled_url)  # stdin at its end
    assert no_answer.returncode == 1
    assert ("default", "notes") in read_all(filled_url)


def test_delete_removes_the_record_and_its_history_when_confirmed(cli: Cli, filled_url: str) -> None:
    out = cli.ok("delete", "crawler", input="y\n", url=filled_url)
    assert "deleted key 'crawler'" in out
    cli.ok("delete", "blob", "--yes", url=filled_url)

    records = read_all(filled_url)
    assert ("default", "crawler") not in records
    assert ("default", "blob") not in records
    assert ("other", "crawler") in records  # another store, untouched
    assert "no record under key 'crawler'" in cli("history", "crawler", url=filled_url).stderr


def test_reset_asks_first_then_removes_the_state_so_its_worker_starts_from_default(
    cli: Cli, filled_url: str
) -> None:
    refused = cli("reset", "crawler", input="n\n", url=filled_url)
    assert refused.returncode == 1
    assert ("default", "crawler") in read_all(filled_url)

    out = cli.ok("reset", "crawler", "--yes", url=filled_url)
    assert "reset key 'crawler' in store 'default' (3 kept snapshots removed too)" in out
    assert ("default", "crawler") not in read_all(filled_url)

    again = cli("reset", "crawler", "--yes", url=filled_url)  # nothing there: an error, as for delete
    assert again.returncode == 1
    assert again.stderr == "error: no record under key 'crawler' in store 'default'\n"


def test_reset_and_delete_of_an_unknown_key_both_exit_1(cli: Cli, filled_url: str) -> None:
    before = read_all(filled_url)
    for command in ("reset", "delete"):
        done = cli(command, "nosuchkey", "--yes", url=filled_url)
        assert (command, done.returncode) == (command, 1)
        assert done.stderr == "error: no record under key 'nosuchkey' in store 'default'\n"
    assert read_all(filled_url) == before


def test_reset_refuses_a_record_that_is_not_a_state(cli: Cli, filled_url: str) -> None:
    done = cli("reset", "notes", "--yes", url=filled_url)
    assert done.returncode == 1
    assert done.stderr == (
        "error: key 'notes' in store 'default' holds text/plain; charset=utf-8, not a state; "
        "use `delete` to remove it\n"
    )
    assert ("default", "notes") in read_all(filled_url)
