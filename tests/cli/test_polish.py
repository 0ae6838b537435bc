"""What a newcomer reads: help, counts, notes and errors say things once and plainly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_support import Cli

pytestmark = pytest.mark.slow

WIDE = {"COLUMNS": "200"}
"""A wide terminal, so that help lines are not wrapped in the middle of what a test looks for."""

TRAILER = {"end": "recoverable-state export", "records": 1}


def _help(cli: Cli, *args: str) -> str:
    done = cli(*args, "--help", url=None, env=WIDE)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("command", [[], ["show"], ["export"], ["reset"], ["quarantine"]], ids=str)
def test_help_shows_flags_without_a_type(cli: Cli, command: list[str]) -> None:
    text = _help(cli, *command)
    assert "<bool>" not in text
    assert re.search(r"--help\s+-h\s+Show this message", text), text


def test_help_of_the_global_options_shows_debug_as_a_plain_flag(cli: Cli) -> None:
    assert re.search(r"--debug\s+On an error, show its traceback", _help(cli))


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("show", "Usage: recoverable-state show [OPTIONS] KEY"),
        ("history", "Usage: recoverable-state history [OPTIONS] KEY"),
        ("import", "Usage: recoverable-state import [OPTIONS] FILE"),
        ("quarantine", "Usage: recoverable-state quarantine [OPTIONS] [KEY]"),
    ],
)
def test_usage_names_arguments_bare(cli: Cli, command: str, usage: str) -> None:
    text = _help(cli, command)
    assert usage in text
    assert "{" not in text.split("\n\n", 2)[1] if "\n\n" in text else True


def test_the_storage_url_is_spelled_one_way_in_help(cli: Cli) -> None:
    text = " ".join(_help(cli).split())
    assert "sqlite:///./storage/state.sqlite3" in text
    assert "sqlite:///storage" not in text
    assert "sqlite:///rel" not in text  # a relative path is written ./rel, as in the default


def test_import_of_one_record_says_record_not_records(cli: Cli, tmp_path: Path) -> None:
    line = {"store": "default", "key": "a", "content_type": "text/plain", "text": "x"}
    (tmp_path / "one.jsonl").write_text(f"{json.dumps(line)}\n{json.dumps(TRAILER)}\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path}/one.sqlite3"
    assert cli.ok("import", "one.jsonl", url=url).startswith("imported 1 record into ")
    assert cli("export", url=url).stderr == "note: exported 1 record from 1 store to stdout\n"


def test_list_of_an_empty_store_prints_a_note_as_stores_does(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    files = f"file://{tmp_path}/files"
    assert cli("stores", url=files).stderr == f"note: there are no stores in {files}\n"

    url = f"sqlite:///{tmp_path}/empty.sqlite3"

    one = {"store": "jobs", "key": "a", "content_type": "text/plain", "text": "x"}
    (tmp_path / "one.jsonl").write_text(f"{json.dumps(one)}\n{json.dumps(TRAILER)}\n", encoding="utf-8")
    cli.ok("import", "one.jsonl", url=url)
    cli.ok("delete", "a", "-s", "jobs", "--yes", url=url)
    done = cli("list", "-s", "jobs", url=url)
    assert done.returncode == 0
    assert done.stdout == ""  # no empty table
    assert done.stderr == "note: store 'jobs' holds no records\n"
    assert json.loads(cli.ok("list", "-s", "jobs", "--json", url=url)) == []


def test_an_unreachable_postgresql_error_names_no_internal_class(cli: Cli) -> None:
    done = cli("--timeout", "0.3", "stores", url="postgresql://x@127.0.0.1:1/db")
    assert done.returncode == 1
    assert "PostgreSQL server postgresql://x@127.0.0.1:1/db unreachable" in done.stderr
    assert not re.search(r"(?<![\w.])_[A-Za-z]\w*", done.stderr), done.stderr
