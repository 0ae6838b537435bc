"""Export and import: JSON Lines, byte-exact between any two storages."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cli_support import Cli, read_all
from cli_worker import ODD_JSON, STATES

pytestmark = pytest.mark.slow


def test_export_writes_one_json_line_per_record_and_nothing_else_to_stdout(cli: Cli, filled_url: str) -> None:
    done = cli("export", url=filled_url)
    assert done.returncode == 0
    *lines, trailer = [json.loads(line) for line in done.stdout.splitlines()]
    assert trailer == {"end": "recoverable-state export", "records": 6}
    by_key = {line["key"]: line for line in lines}
    assert sorted(by_key) == sorted([*STATES, "notes", "blob", "odd-json"])
    assert {line["store"] for line in lines} == {"default"}
    assert by_key["crawler"]["value"]["done"] == 5  # a state: its JSON itself
    assert by_key["notes"]["text"] == "line one\nline two — ünïcode\n"
    assert by_key["odd-json"]["text"].encode() == ODD_JSON  # not compact: its exact text
    assert base64.b64decode(by_key["blob"]["base64"]) == bytes(range(256)) + b"\xff\xfe"
    assert done.stderr == "note: exported 6 records from 1 store to stdout\n"  # no progress bar in a pipe


def test_export_import_round_trip_is_byte_exact_into_another_backend(
    cli: Cli, filled_url: str, other_url: str, tmp_path: Path
) -> None:
    cli.ok("export", "--all", "-o", "dump.jsonl", url=filled_url)
    assert "imported 7 records" in cli.ok("import", "dump.jsonl", url=other_url)

    assert read_all(other_url) == read_all(filled_url)
    cli.ok("export", "--all", "-o", "again.jsonl", url=other_url)
    first = (tmp_path / "dump.jsonl").read_text(encoding="utf-8").splitlines()
    second = (tmp_path / "again.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(second) == sorted(first)


def test_import_into_a_named_store_puts_every_record_there(cli: Cli, filled_url: str, tmp_path: Path) -> None:
    (tmp_path / "other.jsonl").write_bytes(cli.raw("export", "--store", "other", url=filled_url))
    cli.ok("import", "other.jsonl", "--store", "copy", url=filled_url)

    records = read_all(filled_url)
    assert records[("copy", "crawler")] == records[("other", "crawler")]
    assert "copy" in {s["name"] for s in json.loads(cli.ok("stores", "--json", url=filled_url))}


def test_import_writes_large_files_in_batches(cli: Cli, tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {"store": f"s{n % 3}", "key": f"k{n:05}", "content_type": "application/json", "value": [n]}
        )
        for n in range(1234)
    ]
    lines.append(json.dumps({"end": "recoverable-state export", "records": 1234}))
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path}/big.sqlite3"
    cli.ok("import", "big.jsonl", url=url)

    records = read_all(url)
    assert len(records) == 1234
    assert records[("s1", "k01000")] == (b"[1000]", "application/json")


def test_import_of_a_bad_line_names_it_and_imports_nothing(cli: Cli, tmp_path: Path) -> None:
    good = json.dumps({"store": "default", "key": "a", "content_type": "text/plain", "text": "x"})
    (tmp_path / "bad.jsonl").write_text(f'{good}\n{good}\n{{"key": "b"}}\n', encoding="utf-8")
    url = f"sqlite:///{tmp_path}/new.sqlite3"

    done = cli("import", "bad.jsonl", url=url)
    assert done.returncode == 1
    assert done.stderr == 'error: bad.jsonl, line 3: "store" must be a string; nothing was imported\n'
    assert not (tmp_path / "new.sqlite3").exists()


def test_export_to_a_file_leaves_no_file_when_it_fails(cli: Cli, filled_url: str, tmp_path: Path) -> None:
    done = cli("export", "--store", "nope", "-o", "dump.jsonl", url=filled_url)
    assert done.returncode == 1
    assert list(tmp_path.glob("*dump.jsonl*")) == []
