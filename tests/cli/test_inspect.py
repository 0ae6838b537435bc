"""Looking into stores: stores, list, show, history, quarantine."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
from cli_support import Cli, read_all, run_async
from cli_worker import ODD_JSON, STATES

from recoverable_state.storage import JSON_CONTENT_TYPE, KeyValueStore, StorageBackend

pytestmark = pytest.mark.slow


def test_stores_lists_every_store_with_its_record_count(cli: Cli, filled_url: str) -> None:
    stores = json.loads(cli.ok("stores", "--json", url=filled_url))
    assert {s["name"]: s["records"] for s in stores} == {"default": 6, "other": 1}
    assert all(len(s["id"]) > 0 for s in stores)

    table = cli.ok("stores", url=filled_url)
    assert "default" in table
    assert "other" in table
    assert stores[0]["id"] in table


def test_list_json_gives_size_time_version_and_content_type_of_each_record(cli: Cli, filled_url: str) -> None:
    listed = json.loads(cli.ok("list", "--json", url=filled_url))
    stored = {key: value for (store, key), value in read_all(filled_url).items() if store == "default"}
    assert [r["key"] for r in listed] == sorted(stored)
    for row in listed:
        data, content_type = stored[row["key"]]
        assert row["size"] == len(data)
        assert row["content_type"] == content_type
        assert row["updated_at"].endswith("+00:00")
    versions = {r["key"]: r["version"] for r in listed}
    assert all(versions[key] == 5 for key in STATES)  # five persists each
    assert versions["notes"] == 1


def test_list_table_names_every_key_in_full_when_piped(cli: Cli, filled_url: str) -> None:
    table = cli.ok("list", url=filled_url)
    for key in [*STATES, "notes", "blob", "odd-json"]:
        assert key in table
    assert "text/plain; charset=utf-8" in table
    other = cli.ok("list", "--store", "other", url=filled_url)
    assert "crawler" in other
    assert "notes" not in other


def test_show_prints_a_state_as_plain_indented_json_when_piped(cli: Cli, filled_url: str) -> None:
    out = cli.ok("show", "crawler", url=filled_url)
    assert json.loads(out) == {"done": 5, "label": "step 5 ✓", "seen": [f"item-{i}" for i in range(1, 6)]}
    assert "\x1b[" not in out  # no colour codes in a pipe
    assert out.startswith("{\n  ")
    state = json.loads(cli.ok("show", "état-ünïcode@x", url=filled_url))
    assert state["done"] == 5
    assert json.loads(cli.ok("show", "crawler", "--store", "other", url=filled_url))["done"] == 5


def test_show_prints_text_as_text_and_bytes_as_base64_with_a_note(cli: Cli, filled_url: str) -> None:
    assert cli.ok("show", "notes", url=filled_url) == "line one\nline two — ünïcode\n"

    done = cli("show", "blob", url=filled_url)
    assert done.returncode == 0
    assert base64.b64decode(done.stdout) == bytes(range(256)) + b"\xff\xfe"
    assert "258 bytes of application/octet-stream" in done.stderr
    assert "--raw" in done.stderr


def test_show_raw_writes_the_exact_stored_bytes(cli: Cli, filled_url: str) -> None:
    assert cli.raw("show", "blob", "--raw", url=filled_url) == bytes(range(256)) + b"\xff\xfe"
    assert cli.raw("show", "odd-json", "--raw", url=filled_url) == ODD_JSON
    state, _ = read_all(filled_url)[("default", "crawler")]
    assert cli.raw("show", "crawler", "--raw", url=filled_url) == state


def test_history_lists_the_kept_snapshots_newest_first(cli: Cli, filled_url: str) -> None:
    snapshots = json.loads(cli.ok("history", "crawler", "--json", url=filled_url))
    assert [s["version"] for s in snapshots] == [5, 4, 3]  # history=3
    assert all(s["content_type"] == JSON_CONTENT_TYPE for s in snapshots)
    assert snapshots[0]["size"] > snapshots[1]["size"] > snapshots[2]["size"]  # one more item each time

    table = cli.ok("history", "crawler", url=filled_url)
    assert table.index(" 5 ") < table.index(" 4 ") < table.index(" 3 ")


def test_history_of_a_record_without_snapshots_is_empty_not_an_error(cli: Cli, filled_url: str) -> None:
    assert json.loads(cli.ok("history", "notes", "--json", url=filled_url)) == []
    done = cli("history", "notes", url=filled_url)
    assert done.returncode == 0
    assert "history=N" in done.stderr


def _quarantine(url: str) -> None:
    async def put(storage: StorageBackend) -> None:
        kvs = await KeyValueStore.open(name="default.quarantine", storage=storage)
        await kvs.set_value("crawler@2026-01-01T00:00:00+00:00", {"done": "not a number"})
        await kvs.put_record("crawler@2026-02-01T00:00:00+00:00", b'{"done": 1', JSON_CONTENT_TYPE)
        other = await KeyValueStore.open(name="other.quarantine", storage=storage)
        await other.set_value("job@x@2026-03-01T00:00:00+00:00", b"\x00\x01")

    run_async(put, url)


def test_quarantine_lists_what_was_set_aside_with_its_origin_time_and_size(cli: Cli, filled_url: str) -> None:
    assert "nothing is in quarantine" in cli("quarantine", url=filled_url).stderr
    _quarantine(filled_url)

    listed = json.loads(cli.ok("quarantine", "--json", url=filled_url))
    assert [(q["store"], q["key"], q["set_aside_at"], q["size"]) for q in listed] == [
        ("default", "crawler", "2026-01-01T00:00:00+00:00", len(b'{"done":"not a number"}')),
        ("default", "crawler", "2026-02-01T00:00:00+00:00", len(b'{"done": 1')),
        ("other", "job@x", "2026-03-01T00:00:00+00:00", 2),
    ]
    only_other = json.loads(cli.ok("quarantine", "--json", "--store", "other", url=filled_url))
    assert [q["key"] for q in only_other] == ["job@x"]

    table = cli.ok("quarantine", url=filled_url)
    assert "2026-02-01T00:00:00+00:00" in table
    assert "job@x" in table


def test_quarantine_key_shows_the_newest_record_set_aside_from_it(cli: Cli, filled_url: str) -> None:
    _quarantine(filled_url)
    newest = cli("quarantine", "crawler", url=filled_url)
    assert newest.returncode == 0
    assert newest.stdout == '{"done": 1\n'  # not valid JSON: shown as text, with a note
    assert "not valid JSON" in newest.stderr
    assert "2 records were set aside" in newest.stderr

    older = cli.ok("quarantine", "crawler@2026-01-01T00:00:00+00:00", url=filled_url)
    assert json.loads(older) == {"done": "not a number"}
    assert cli.raw("quarantine", "job@x", "--raw", url=filled_url) == b"\x00\x01"


def test_the_installed_script_runs_the_same_command(cli: Cli, filled_url: str, tmp_path: Path) -> None:
    import subprocess

    script = Path(sys.executable).parent / "recoverable-state"
    if not script.exists():
        pytest.skip("the package is not installed with its console script")
    done = subprocess.run(
        [str(script), "--storage-url", filled_url, "stores", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert {s["name"] for s in json.loads(done.stdout)} == {"default", "other"}
