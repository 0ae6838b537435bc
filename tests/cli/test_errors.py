"""Failures: one clear line on stderr and exit 1 (2 for usage), a traceback only with --debug."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import Cli

pytestmark = pytest.mark.slow

BAD_ARGUMENTS = {
    "unknown key": (["show", "nope"], "error: no record under key 'nope' in store 'default'"),
    "unknown store": (["list", "--store", "nope"], "error: store 'nope': no such store in sqlite:///"),
    "unknown store for a key": (["show", "crawler", "-s", "nope"], "error: store 'nope': no such store"),
    "empty key": (["show", ""], "error: store 'default', key '': a key must not be empty"),
    "control character in key": (["delete", "a\tb", "--yes"], "key 'a\\tb': a key must not hold control"),
    "unknown key to delete": (["delete", "nope", "--yes"], "error: no record under key 'nope'"),
    "history of unknown key": (["history", "nope"], "error: no record under key 'nope'"),
    "snapshot not kept": (["restore", "crawler", "--to", "1"], "no snapshot of version 1 is kept"),
    "missing import file": (["import", "missing.jsonl"], "error: [Errno 2] No such file or directory"),
    "nothing in quarantine": (
        ["quarantine", "crawler"],
        "error: nothing from key 'crawler' is in quarantine",
    ),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_a_bad_argument_is_one_clear_line_and_exit_1(
    cli: Cli, filled_url: str, case: tuple[list[str], str]
) -> None:
    args, expected = case
    done = cli(*args, url=filled_url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert expected in done.stderr


def test_an_unknown_store_is_not_created_by_looking_at_it(cli: Cli, filled_url: str) -> None:
    cli("list", "--store", "nope", url=filled_url)
    assert {s["name"] for s in json.loads(cli.ok("stores", "--json", url=filled_url))} == {"default", "other"}


UNREACHABLE = {
    "redis": ("redis://127.0.0.1:1/0", "Redis server redis://127.0.0.1:1/0 unreachable for 0.3 s"),
    "postgresql": (
        "postgresql://x@127.0.0.1:1/db",
        "PostgreSQL server postgresql://x@127.0.0.1:1/db unreachable",
    ),
    "unknown scheme": ("bogus://somewhere", "error: storage URL 'bogus://somewhere' has an unknown scheme"),
}


@pytest.mark.parametrize("case", UNREACHABLE.values(), ids=UNREACHABLE.keys())
def test_an_unreachable_storage_is_one_clear_line_and_exit_1(cli: Cli, case: tuple[str, str]) -> None:
    url, expected = case
    done = cli("--timeout", "0.3", "stores", url=url)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert expected in done.stderr


def test_reading_a_missing_sqlite_database_is_an_error_that_creates_nothing(cli: Cli, tmp_path: Path) -> None:
    done = cli("list", url=None)  # the default URL: ./storage/state.sqlite3
    assert done.returncode == 1
    assert done.stderr.startswith("error: there is no SQLite database at 'storage/state.sqlite3'")
    assert list(tmp_path.iterdir()) == []


def test_the_storage_url_defaults_to_the_environment_variable(cli: Cli, filled_url: str) -> None:
    done = cli("stores", "--json", url=None, env={"RECOVERABLE_STATE_STORAGE_URL": filled_url})
    assert done.returncode == 0, done.stderr
    assert {s["name"] for s in json.loads(done.stdout)} == {"default", "other"}


def test_a_bad_environment_variable_is_one_clear_line(cli: Cli, filled_url: str) -> None:
    env = {"RECOVERABLE_STATE_STORAGE_URL": filled_url, "RECOVERABLE_STATE_SHUTDOWN_TIMEOUT": "soon"}
    done = cli("stores", url=None, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("error: a RECOVERABLE_STATE_* environment variable is not valid: ")
    assert "shutdown_timeout" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_debug_shows_the_traceback_before_the_error_line(cli: Cli, filled_url: str) -> None:
    done = cli("--debug", "show", "nope", url=filled_url)
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.splitlines()[-1] == "error: no record under key 'nope' in store 'default'"


@pytest.mark.parametrize(
    "args", [["export", "--all", "--store", "x"], ["restore", "crawler"], ["frobnicate"]], ids=str
)
def test_a_usage_error_exits_2(cli: Cli, filled_url: str, args: list[str]) -> None:
    done = cli(*args, url=filled_url)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
