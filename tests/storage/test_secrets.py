"""Secrets at rest and records you can trust, on every store and both loops.

Records are sealed with the key ring's first key and opened with any of its
keys; the stored bytes hold nothing of the value. Every record carries a
checksum: a damaged one is a RecordCorruptError before anything parses it, and
`on_bad_record="previous"` starts from the newest good snapshot of its history.
A record sealed with a key the ring lacks, or that fails authentication, is an
error naming store, key and key id, and is never overwritten.
"""

from __future__ import annotations

import base64
import logging
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from recoverable_state import (
    Configuration,
    KeyRing,
    KeyValueStore,
    RecordCorruptError,
    RecordDecryptionError,
    RecoverableState,
    service_locator,
)
from recoverable_state.storage import (
    CHECKSUM_PARAM,
    SEALED_CONTENT_TYPE,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    open_backend,
    sealed_key_id,
)
from recoverable_state.storage._envelope import seal, unseal

pytestmark = pytest.mark.anyio

SECRET = "tok-5b1e0c9d-very-secret-cookie"


def key(n: int = 32) -> bytes:
    return os.urandom(n)


def ring_text(*keys: tuple[str, bytes]) -> str:
    return ",".join(f"{key_id}:{base64.b64encode(material).decode()}" for key_id, material in keys)


class Session(BaseModel):
    cookie: str = ""
    pages: int = 0


@pytest.fixture
async def storage(storage_url: str) -> Any:
    backend = open_backend(storage_url)
    service_locator.set_storage(backend)
    yield backend
    await backend.aclose()


def state(**options: Any) -> RecoverableState[Session]:
    return RecoverableState(
        default_state=Session(), persist_state_key="session", persistence_enabled="explicit_only", **options
    )


async def save(cookie: str, pages: int, **options: Any) -> None:
    s = state(**options)
    value = await s.initialize()
    value.cookie, value.pages = cookie, pages
    await s.teardown()


async def stored(storage: StorageBackend) -> StoredRecord:
    """The record as the backend holds it, bypassing the layer that seals and checks."""
    kvs = await KeyValueStore.open()
    (record,) = await storage.read_batch([RecordRead(kvs.id, "session")])
    assert isinstance(record, StoredRecord)
    return record


async def overwrite_raw(storage: StorageBackend, value: bytes, content_type: str) -> None:
    """Put bytes in place of the record as a failing disk would: no sealing, no new checksum."""
    kvs = await KeyValueStore.open()
    (outcome,) = await storage.write_batch([RecordWrite(kvs.id, "session", value, content_type)])
    assert not isinstance(outcome, Exception)


async def test_a_record_in_clear_carries_a_checksum_and_loads_back(storage: StorageBackend) -> None:
    await save(SECRET, 3)
    raw = await stored(storage)
    assert f"; {CHECKSUM_PARAM}=" in raw.content_type
    assert SECRET.encode() in raw.value  # in clear: readable by design
    assert await state().initialize() == Session(cookie=SECRET, pages=3)
    (listed,) = await (await KeyValueStore.open()).list_keys()
    assert CHECKSUM_PARAM not in listed.content_type  # a listing shows the record's own type


async def test_a_sealed_record_holds_nothing_of_the_value_and_opens_with_the_ring(
    storage: StorageBackend,
) -> None:
    storage.key_ring = KeyRing.parse(ring_text(("k1", key())))
    await save(SECRET, 3)
    raw = await stored(storage)
    assert SECRET.encode() not in raw.value and b"cookie" not in raw.value
    assert raw.content_type.startswith(SEALED_CONTENT_TYPE)
    assert sealed_key_id(raw.content_type) == "k1"
    assert await state().initialize() == Session(cookie=SECRET, pages=3)


async def test_a_record_written_in_clear_loads_under_a_ring_and_is_sealed_at_its_next_write(
    storage: StorageBackend,
) -> None:
    await save(SECRET, 1)
    storage.key_ring = KeyRing.parse(ring_text(("k1", key())))
    s = state()
    assert (await s.initialize()).pages == 1
    s.current_value.pages = 2
    await s.teardown()
    assert sealed_key_id((await stored(storage)).content_type) == "k1"


async def test_rotation_opens_records_under_both_keys_and_seals_with_the_new_one(
    storage: StorageBackend,
) -> None:
    old, new = ("old", key()), ("new", key(16))
    storage.key_ring = KeyRing.parse(ring_text(old))
    await save(SECRET, 1)
    kvs = await KeyValueStore.open()
    await kvs.set_value("other", {"n": 1})
    storage.key_ring = KeyRing.parse(ring_text(new, old))  # the new key first
    s = state()
    assert (await s.initialize()).pages == 1
    s.current_value.pages = 2
    await s.teardown()
    assert sealed_key_id((await stored(storage)).content_type) == "new"
    assert await kvs.get_value("other") == {"n": 1}  # still under the old key, still readable
    storage.key_ring = KeyRing.parse(ring_text(new))  # the old key gone: its record no longer opens
    with pytest.raises(RecordDecryptionError) as caught:
        await kvs.get_value("other")
    assert caught.value.key_id == "old" and caught.value.key == "other"


async def test_a_missing_key_is_an_error_naming_store_key_and_key_id_and_the_record_stays(
    storage: StorageBackend,
) -> None:
    storage.key_ring = KeyRing.parse(ring_text(("k1", key())))
    await save(SECRET, 5)
    before = await stored(storage)
    for ring in (KeyRing.parse(ring_text(("k2", key()))), None):
        storage.key_ring = ring
        for on_bad_record in ("raise", "quarantine"):
            s = state(on_bad_record=on_bad_record)
            with pytest.raises(RecordDecryptionError, match=r"store 'default', key 'session'.*'k1'"):
                await s.initialize()
    after = await stored(storage)  # loading claimed it (fencing), and changed nothing else
    assert (after.value, after.content_type) == (before.value, before.content_type)
    quarantine = await KeyValueStore.open(name="default.quarantine")
    assert await quarantine.list_keys() == []


async def test_a_tampered_ciphertext_fails_authentication_and_a_damaged_one_its_checksum(
    storage: StorageBackend,
) -> None:
    ring = KeyRing.parse(ring_text(("k1", key())))
    storage.key_ring = ring
    await save(SECRET, 5)
    record = await stored(storage)
    flipped = record.value[:-1] + bytes([record.value[-1] ^ 1])
    await overwrite_raw(storage, flipped, record.content_type)  # the checksum no longer matches
    with pytest.raises(RecordCorruptError, match="checksum"):
        await state().initialize()
    resealed_type = seal(flipped, "x", None)[1].replace(
        "x", record.content_type.split(f"; {CHECKSUM_PARAM}")[0]
    )
    await overwrite_raw(storage, flipped, resealed_type)  # a checksum made over the tampered bytes
    with pytest.raises(RecordDecryptionError, match="does not open"):
        await state().initialize()


async def test_a_flipped_digit_in_a_record_in_clear_is_found_before_validation(
    storage: StorageBackend,
) -> None:
    await save("c", 1234)
    record = await stored(storage)
    damaged = record.value.replace(b"1234", b"1294")  # still JSON, still a valid Session
    await overwrite_raw(storage, damaged, record.content_type)
    with pytest.raises(RecordCorruptError, match=r"key 'session'.*checksum"):
        await state().initialize()


async def test_a_record_written_before_checksums_loads_unchanged(storage: StorageBackend) -> None:
    await save("c", 1)
    await overwrite_raw(storage, b'{"cookie":"old","pages":9}', "application/json; charset=utf-8")
    assert await state().initialize() == Session(cookie="old", pages=9)


async def test_a_damaged_record_falls_back_to_its_newest_good_snapshot(
    storage: StorageBackend, caplog: pytest.LogCaptureFixture
) -> None:
    await save("first", 1, history=3)
    await save("second", 2, history=3)
    record = await stored(storage)
    await overwrite_raw(storage, record.value.replace(b"second", b"sec0nd"), record.content_type)
    s = state(history=3, on_bad_record="previous")
    with caplog.at_level(logging.WARNING, logger="recoverable_state"):
        value = await s.initialize()
    assert value == Session(cookie="second", pages=2)  # the snapshot of the same write, in history
    warning = next(r.getMessage() for r in caplog.records if "history" in r.getMessage())
    assert "key 'session'" in warning and "versions skipped" in warning
    quarantine = await KeyValueStore.open(name="default.quarantine")
    assert len(await quarantine.list_keys()) == 1
    value.pages = 3
    await s.teardown()  # the next persist writes a good record over the damaged one
    assert await state().initialize() == Session(cookie="second", pages=3)


def test_previous_needs_a_history() -> None:
    with pytest.raises(ValueError, match="history"):
        state(on_bad_record="previous")


def test_key_material_never_appears_in_reprs_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    material = key()
    text = ring_text(("k1", material))
    monkeypatch.setenv("RECOVERABLE_STATE_ENCRYPTION_KEYS", text)
    config = Configuration()
    encoded = base64.b64encode(material).decode()
    for shown in (repr(config), str(config), repr(KeyRing.parse(text)), config.model_dump_json()):
        assert encoded not in shown
    with pytest.raises(ValueError, match="'k1' is not valid base64") as caught:
        KeyRing.parse(f"k1:{encoded[:-4]}!!!!")
    assert encoded[:-4] not in str(caught.value)
    with pytest.raises(ValueError, match="16, 24 or 32 bytes"):
        KeyRing.parse(ring_text(("short", b"12345")))


async def test_the_configured_ring_seals_the_default_storage(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("RECOVERABLE_STATE_STORAGE_URL", f"sqlite:///{tmp_path}/c.sqlite3")
    monkeypatch.setenv("RECOVERABLE_STATE_ENCRYPTION_KEYS", ring_text(("env", key())))
    service_locator.reset()
    await save(SECRET, 1)
    assert sealed_key_id((await stored(service_locator.get_storage())).content_type) == "env"
    await service_locator.get_storage().aclose()


@settings(max_examples=200, deadline=None)
@given(
    value=st.binary(max_size=300),
    content_type=st.sampled_from(
        ["application/json; charset=utf-8", "text/plain", "application/octet-stream"]
    ),
    keys=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True),
    sealing=st.booleans(),
)
def test_what_is_sealed_opens_under_any_ring_that_holds_its_key(
    value: bytes, content_type: str, keys: list[str], sealing: bool
) -> None:
    materials = {k: bytes([ord(k)]) * 32 for k in "abcd"}
    ring = KeyRing([(k, materials[k]) for k in keys]) if sealing else None
    stored_value, stored_type = seal(value, content_type, ring)
    record = StoredRecord("k", stored_value, stored_type, 3, None)  # type: ignore[arg-type]
    for other in (keys, [*reversed(keys)], [keys[0], *[k for k in "abcd" if k not in keys]]):
        opened = unseal(record, KeyRing([(k, materials[k]) for k in other]) if sealing else None, store="s")
        assert (opened.value, opened.content_type, opened.version) == (value, content_type, 3)


def test_a_forked_child_never_seals_with_a_nonce_its_parent_drew() -> None:
    """Nonces are drawn in blocks; a child of fork() draws its own, so no nonce is used twice."""
    ring = KeyRing.parse(ring_text(("k1", key())))
    ring.seal(b"{}", "application/json")  # the parent has drawn a block, and holds the rest of it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the nonces of its next seals
        os.close(read_end)
        nonces = [ring.seal(b"{}", "application/json")[0][4:16] for _ in range(3)]
        os.write(write_end, b"".join(nonces))
        os._exit(0)
    os.close(write_end)
    parent = [ring.seal(b"{}", "application/json")[0][4:16] for _ in range(3)]
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    child = [data[i : i + 12] for i in range(0, len(data), 12)]
    assert len(child) == 3
    assert not set(child) & set(parent)


async def test_a_batch_sealed_in_a_worker_thread_is_sealed_and_checked_like_a_small_one(
    storage: StorageBackend,
) -> None:
    """From SEAL_IN_THREAD_FROM writes on, the batch is sealed off the event loop: same records."""
    from recoverable_state.storage._batching import SEAL_IN_THREAD_FROM

    storage.key_ring = KeyRing.parse(ring_text(("k1", key())))
    kvs = await KeyValueStore.open(name="many")
    n = SEAL_IN_THREAD_FROM + 7
    values = [f'{{"cookie":"{SECRET}-{i}"}}'.encode() for i in range(n)]
    puts = [(kvs, kvs.prepare_put(f"k{i}", v, "application/json")) for i, v in enumerate(values)]
    outcomes = await KeyValueStore.put_together(puts)
    assert not [o for o in outcomes if isinstance(o, Exception)]
    raws = await storage.read_batch([RecordRead(kvs.id, f"k{i}") for i in (0, n // 2, n - 1)])
    for raw in raws:
        assert isinstance(raw, StoredRecord)
        assert SECRET.encode() not in raw.value
        assert sealed_key_id(raw.content_type) == "k1" and f"; {CHECKSUM_PARAM}=" in raw.content_type
    back = await KeyValueStore.get_together([(kvs, f"k{i}", False) for i in range(n)])
    assert [r.value for r in back if isinstance(r, StoredRecord)] == values
