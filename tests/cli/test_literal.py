"""What the CLI prints keeps secrets and shows data as it is: no password, no markup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import Cli

from servers import PostgresServer, flush_postgres

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-pw"

ODD_NAMES = {
    ("[bold]jobs[/bold]", "[/]"),
    ("[bold]jobs[/bold]", "[red]job-1[/red]"),
    ("[bold]jobs[/bold]", "plain"),
}


def _dump(path: Path, records: set[tuple[str, str]]) -> None:
    lines = [
        json.dumps({"store": store, "key": key, "content_type": "application/json", "value": {"n": 1}})
        for store, key in sorted(records)
    ]
    lines.append(json.dumps({"end": "recoverable-state export", "records": len(records)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def secret_url(postgres_server: PostgresServer) -> str:
    """The test PostgreSQL server (it trusts loopback, so any password works) with a password."""
    url = str(postgres_server.url)
    flush_postgres(url)
    return url.replace("postgres@", f"postgres:{SECRET}@", 1)


def test_no_command_prints_the_password_of_the_storage_url(cli: Cli, secret_url: str, tmp_path: Path) -> None:
    outputs = []

    def run(*args: str, input: str | None = None) -> None:
        done = cli(*args, url=secret_url, input=input)
        outputs.append((args, done.returncode, done.stdout + done.stderr))

    run("stores")  # a note naming the storage
    _dump(tmp_path / "dump.jsonl", {("jobs", "a"), ("jobs", "b")})
    run("import", "dump.jsonl")
    run("list", "--store", "nope")  # an error naming the storage
    run("delete", "a", "-s", "jobs", input="n\n")  # the question names the storage
    run("reset", "b", "-s", "jobs", "--yes")
    run("export", "--all")
    run("--debug", "show", "nope")  # a traceback too

    for args, _, text in outputs:
        assert SECRET not in text, (args, text)
    assert [code for _, code, _ in outputs] == [0, 0, 1, 1, 0, 0, 1]
    assert "imported 2 records into postgresql://postgres@127.0.0.1:" in outputs[1][2]
    assert "of postgresql://postgres@127.0.0.1:" in outputs[3][2]


def test_an_unreachable_server_is_named_without_its_password(cli: Cli) -> None:
    done = cli("--timeout", "0.3", "stores", url=f"redis://:{SECRET}@127.0.0.1:1/0")
    assert done.returncode == 1
    assert SECRET not in done.stderr
    assert "redis://127.0.0.1:1/0" in done.stderr


def test_keys_and_store_names_are_printed_literally_not_as_markup(cli: Cli, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/odd.sqlite3"
    _dump(tmp_path / "odd.jsonl", ODD_NAMES)
    cli.ok("import", "odd.jsonl", url=url)

    stores = cli("stores", url=url)
    assert stores.returncode == 0, stores.stderr
    assert "[bold]jobs[/bold]" in stores.stdout

    listed = cli("list", "-s", "[bold]jobs[/bold]", url=url)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert "store '[bold]jobs[/bold]'" in listed.stdout  # the title
    for _, key in ODD_NAMES:
        assert key in listed.stdout

    shown = cli.ok("history", "[/]", "-s", "[bold]jobs[/bold]", url=url)
    assert shown == ""  # no snapshots: a note on stderr, and no crash
