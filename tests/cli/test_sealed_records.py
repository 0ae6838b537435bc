"""The CLI with a key ring: show, export and import open and seal; rekey moves records to the new key.

Records are written sealed by the library itself (a key ring on the backend);
the CLI reads RECOVERABLE_STATE_ENCRYPTION_KEYS as a worker does. Without the
key a command says which key id sealed the record and never prints its bytes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from cli_support import Cli, empty_storage

from recoverable_state.storage import (
    KeyValueStore,
    RecordRead,
    StorageBackend,
    open_backend,
    sealed_key_id,
)

pytestmark = pytest.mark.slow

K0 = "k0:" + base64.b64encode(b"0" * 32).decode()
K1 = "k1:" + base64.b64encode(b"1" * 32).decode()
K2 = "k2:" + base64.b64encode(b"2" * 32).decode()
SECRET = "cookie-Zq8xW"


def _run(url: str, keys: str | None, fn: Any) -> Any:
    async def main() -> Any:
        backend = open_backend(url, encryption_keys=keys)
        try:
            return await fn(backend)
        finally:
            await backend.aclose()

    return anyio.run(main)


def write(url: str, keys: str | None, store: str, values: dict[str, Any], *, history: int = 0) -> None:
    """Write each value as the current record of its key (as JSON), sealed when `keys` is set."""

    async def body(backend: StorageBackend) -> None:
        kvs = await KeyValueStore.open(name=store, storage=backend)
        for key, value in values.items():
            data = json.dumps(value, separators=(",", ":")).encode()  # compact, as states are
            await kvs.put_record(key, data, "application/json", keep_history=history)

    _run(url, keys, body)


def stored(url: str, store: str) -> dict[str, tuple[bytes, str]]:
    """Each record of `store` exactly as the backend holds it (sealed bytes, stored content type)."""

    async def body(backend: StorageBackend) -> dict[str, tuple[bytes, str]]:
        kvs = await KeyValueStore.open(name=store, storage=backend)
        keys = [info.key for info in await kvs.list_keys()]
        found = await backend.read_batch([RecordRead(kvs.id, key) for key in keys])
        return {
            r.key: (r.value, r.content_type) for r in found if r is not None and not isinstance(r, Exception)
        }

    result: dict[str, tuple[bytes, str]] = _run(url, None, body)
    return result


def read(url: str, keys: str, store: str, key: str) -> Any:
    async def body(backend: StorageBackend) -> Any:
        return await (await KeyValueStore.open(name=store, storage=backend)).get_value(key)

    return _run(url, keys, body)


@pytest.fixture(params=["sqlite", "file", "redis", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return empty_storage(request, request.param, tmp_path)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.sqlite3"


def ring(*keys: str) -> dict[str, str]:
    return {"RECOVERABLE_STATE_ENCRYPTION_KEYS": ",".join(keys)}


def test_show_opens_a_sealed_record_with_the_ring_and_says_so(cli: Cli, sqlite_url: str) -> None:
    write(sqlite_url, K1, "default", {"session": {"cookie": SECRET}})
    done = cli("show", "session", url=sqlite_url, env=ring(K1))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cookie": SECRET}
    assert "decrypted with encryption key 'k1'" in done.stderr


def test_without_the_key_show_and_export_name_the_key_id_and_print_nothing_of_the_record(
    cli: Cli, sqlite_url: str, tmp_path: Path
) -> None:
    write(sqlite_url, K1, "default", {"session": {"cookie": SECRET}})
    for env in ({}, ring(K2)):  # no ring at all; a ring without k1
        shown = cli("show", "session", url=sqlite_url, env=env)
        assert shown.returncode == 1
        assert shown.stdout == ""
        assert "'k1'" in shown.stderr and "'session'" in shown.stderr and "'default'" in shown.stderr
        exported = cli("export", "-o", "dump.jsonl", url=sqlite_url, env=env)
        assert exported.returncode == 1
        assert "'k1'" in exported.stderr
        assert not (tmp_path / "dump.jsonl").exists()  # a file appears only when whole
    listed = cli.ok("list", "--json", url=sqlite_url)
    assert [item["content_type"] for item in json.loads(listed)] == [
        "application/vnd.recoverable-state.sealed; key-id=k1"
    ]


def test_export_with_the_ring_writes_values_in_clear_and_warns_import_seals_with_the_current_key(
    cli: Cli, url: str, sqlite_url: str, tmp_path: Path
) -> None:
    write(sqlite_url, K1, "default", {"a": {"cookie": SECRET}, "b": [1, 2, 3]})
    write(sqlite_url, None, "default", {"clear": {"n": 1}})  # written before encryption was on
    done = cli("export", "-o", "dump.jsonl", url=sqlite_url, env=ring(K1))
    assert done.returncode == 0, done.stderr
    assert "2 records sealed in the store were decrypted" in done.stderr
    lines = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    assert {line["key"]: line["value"] for line in lines[:-1]} == {
        "a": {"cookie": SECRET},
        "b": [1, 2, 3],
        "clear": {"n": 1},
    }

    target = url if not url.startswith("sqlite") else f"sqlite:///{tmp_path}/other.sqlite3"
    imported = cli("import", "dump.jsonl", url=target, env=ring(K2, K1))
    assert imported.returncode == 0, imported.stderr
    assert "sealed with encryption key 'k2'" in imported.stdout
    raw = stored(target, "default")
    assert sorted(raw) == ["a", "b", "clear"]
    for value, content_type in raw.values():
        assert sealed_key_id(content_type) == "k2"
        assert SECRET.encode() not in value
    assert read(target, K2, "default", "a") == {"cookie": SECRET}


def test_rekey_seals_every_record_with_the_new_key_so_the_old_one_can_go(cli: Cli, url: str) -> None:
    write(url, K1, "default", {f"s{i}": {"i": i, "cookie": SECRET} for i in range(7)})
    write(url, None, "default", {"clear": {"n": 1}})
    write(url, K2, "other", {"new": {"n": 2}})

    dry = cli("rekey", "--dry-run", url=url, env=ring(K2, K1))
    assert dry.returncode == 0, dry.stderr
    assert "would seal 8 records with key 'k2' (1 from clear records, 7 from key 'k1')" in dry.stdout
    assert "1 record already sealed with key 'k2'" in dry.stdout
    assert sealed_key_id(stored(url, "default")["s0"][1]) == "k1"  # nothing written

    done = cli("rekey", "--yes", url=url, env=ring(K2, K1))
    assert done.returncode == 0, done.stderr
    assert "sealed 8 records with key 'k2'" in done.stdout
    for store in ("default", "other"):
        assert {sealed_key_id(t) for _, t in stored(url, store).values()} == {"k2"}
    assert read(url, K2, "default", "s3") == {"i": 3, "cookie": SECRET}  # k1 is no longer needed
    assert read(url, K2, "default", "clear") == {"n": 1}
    again = cli("rekey", "--yes", url=url, env=ring(K2, K1))
    assert "sealed 0 records" in again.stdout and "9 records already sealed" in again.stdout


def test_rekey_counts_kept_history_under_the_old_key_and_leaves_it(cli: Cli, sqlite_url: str) -> None:
    write(sqlite_url, K1, "default", {"s": {"v": 1}}, history=3)
    done = cli("rekey", "--yes", url=sqlite_url, env=ring(K2, K1))
    assert done.returncode == 0, done.stderr
    assert "kept history still holds 1 snapshot not sealed with key 'k2' (1 under key 'k1')" in done.stdout
    history = cli("history", "s", url=sqlite_url, env=ring(K2, K1))
    assert history.returncode == 0 and "application/json" in history.stdout


def test_rekey_leaves_a_record_whose_key_is_not_in_the_ring_and_fails(cli: Cli, sqlite_url: str) -> None:
    write(sqlite_url, K0, "default", {"lost": {"v": 0}})
    write(sqlite_url, K1, "default", {"kept": {"v": 1}})
    before = stored(sqlite_url, "default")["lost"]
    done = cli("rekey", "--yes", url=sqlite_url, env=ring(K2, K1))
    assert done.returncode == 1
    assert "sealed 1 record with key 'k2'" in done.stdout
    assert "default/lost" in done.stderr and "'k0'" in done.stderr
    assert stored(sqlite_url, "default")["lost"] == before  # left exactly as it was
    assert read(sqlite_url, K0, "default", "lost") == {"v": 0}


def test_rekey_without_a_ring_says_what_to_set(cli: Cli, sqlite_url: str) -> None:
    write(sqlite_url, None, "default", {"s": 1})
    done = cli("rekey", "--yes", url=sqlite_url)
    assert done.returncode == 1
    assert "RECOVERABLE_STATE_ENCRYPTION_KEYS" in done.stderr
    assert "Traceback" not in done.stderr


def test_rekey_asks_first_and_a_no_changes_nothing(cli: Cli, sqlite_url: str) -> None:
    write(sqlite_url, K1, "default", {"s": 1})
    done = cli("rekey", url=sqlite_url, input="n\n", env=ring(K2, K1))
    assert done.returncode == 1
    assert "nothing changed" in done.stderr
    assert sealed_key_id(stored(sqlite_url, "default")["s"][1]) == "k1"


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(b"s" * 32).decode(),  # a bare key, no id
        "k1:" + base64.b64encode(b"s" * 32).decode() + "," + base64.b64encode(b"t" * 32).decode(),
        "k1:" + base64.b64encode(b"s" * 7).decode(),  # a key of the wrong size
        "k1:not base64!",
    ],
)
def test_a_bad_ring_is_an_error_that_never_quotes_key_material(cli: Cli, sqlite_url: str, text: str) -> None:
    write(sqlite_url, None, "default", {"s": 1})
    done = cli("show", "s", url=sqlite_url, env={"RECOVERABLE_STATE_ENCRYPTION_KEYS": text})
    assert done.returncode == 1
    assert "RECOVERABLE_STATE_ENCRYPTION_KEYS" in done.stderr
    assert "Traceback" not in done.stderr
    for part in text.replace(",", ":").split(":"):
        if len(part) > 4:
            assert part not in done.stderr
            assert part[:8] not in done.stderr
