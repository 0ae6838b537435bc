"""The file store: keys never escape the store's directory; damage is reported, not hidden."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from recoverable_state import InvalidKeyError, KeyValueStore, RecordCorruptError, StorageError
from recoverable_state.storage import RecordDelete, RecordWrite, WriteOutcome, open_backend

pytestmark = pytest.mark.anyio

ESCAPING_KEYS = [
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    ".hidden",
    "a/b/c",
    "back\\slash",
    "~",
    "%2E%2E",
    "k" * 1000,
    "ключ-日本語-🙂",
    "CON",
    " spaces ",
]


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


async def test_escaping_keys_stay_inside_the_store(tmp_path: Path) -> None:
    root = tmp_path / "files"
    backend = open_backend(f"file://{root}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    for i, key in enumerate(ESCAPING_KEYS):
        await kvs.set_value(key, {"i": i})
    store_dir = root / kvs.id
    for path in all_files(tmp_path):
        assert store_dir in path.parents or path.parent == store_dir or path.parent == root, path
        assert len(path.name.encode()) <= 255
    assert not (tmp_path / "x").exists()
    for i, key in enumerate(ESCAPING_KEYS):
        assert await kvs.get_value(key) == {"i": i}
    assert sorted(r.key for r in await kvs.list_keys()) == sorted(ESCAPING_KEYS)
    await backend.aclose()


@pytest.mark.parametrize("key", ["", "nul\x00byte", "new\nline", "k" * 1025])
async def test_invalid_keys_are_refused_with_store_and_key(tmp_path: Path, key: str) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    with pytest.raises(InvalidKeyError, match="store 'jobs'"):
        await kvs.set_value(key, 1)
    assert await kvs.list_keys() == []
    await backend.aclose()


async def test_a_damaged_record_file_names_the_store_and_file(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(storage=backend)
    await kvs.set_value("good", {"a": 1})
    await kvs.set_value("bad", {"a": 2})
    (tmp_path / kvs.id / "bad.rec").write_bytes(b"\x00\x01 torn")
    with pytest.raises(RecordCorruptError, match=r"bad\.rec"):
        await kvs.get_value("bad")
    assert await kvs.get_value("good") == {"a": 1}
    await backend.aclose()


async def test_leftover_temporary_files_are_not_records(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(storage=backend)
    await kvs.set_value("k", "v")
    (tmp_path / kvs.id / ".tmp-deadbeef").write_bytes(b"half a rec")
    assert [r.key for r in await kvs.list_keys()] == ["k"]
    assert await kvs.get_value("k") == "v"
    await backend.aclose()


async def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(storage=backend)
    await kvs.set_value("k", "x" * 10_000)
    inode = os.stat(tmp_path / kvs.id / "k.rec").st_ino
    await kvs.set_value("k", "y")
    # A new file was renamed over the old one (never rewritten in place).
    assert os.stat(tmp_path / kvs.id / "k.rec").st_ino != inode
    assert await kvs.get_value("k") == "y"
    await backend.aclose()


# -- keys stay apart ---------------------------------------------------------------


async def test_the_hashed_name_of_a_long_key_is_never_another_keys_name(tmp_path: Path) -> None:
    import hashlib

    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    long_key = "secret-" + "x" * 400
    await kvs.set_value(long_key, {"token": "s3cr3t"})
    twin = "~" + hashlib.sha256(long_key.encode()).hexdigest()
    assert await kvs.get_value(twin) is None  # it does not read the long key's record
    await kvs.set_value(twin, {"other": 1})
    assert await kvs.get_value(long_key) == {"token": "s3cr3t"}  # nor replace it
    assert sorted(r.key for r in await kvs.list_keys()) == sorted([long_key, twin])
    await backend.aclose()


async def test_keys_differing_only_in_case_never_share_a_file(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    keys = ["Job-1", "job-1", "JOB-1", "jOb-1", "%4Aob-1", "ß", "SS", "ss"]
    for i, key in enumerate(keys):
        await kvs.set_value(key, i)
    names = [p.name for p in (tmp_path / kvs.id).iterdir() if p.name.endswith(".rec")]
    # On a file system that ignores case, these names would still be distinct.
    assert len({n.lower() for n in names}) == len(keys)
    for i, key in enumerate(keys):
        assert await kvs.get_value(key) == i
    await backend.aclose()


async def test_a_store_written_by_the_first_format_is_upgraded_in_place(tmp_path: Path) -> None:
    import json

    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="old", storage=backend)
    await kvs.set_value("Job-1", {"n": 1})
    await backend.aclose()
    directory = tmp_path / kvs.id
    # Make it look as the first format wrote it: the key's case kept in its file name.
    os.replace(directory / "%4Aob-1.rec", directory / "Job-1.rec")
    meta = json.loads((directory / ".store.json").read_text())
    del meta["format"]
    (directory / ".store.json").write_text(json.dumps(meta))
    again = await KeyValueStore.open(name="old", storage=open_backend(f"file://{tmp_path}"))
    assert await again.get_value("Job-1") == {"n": 1}
    assert (directory / "%4Aob-1.rec").exists() and not (directory / "Job-1.rec").exists()


# -- links and modes ---------------------------------------------------------------


@pytest.mark.parametrize("planted", [".history", ".lock", "k.rec", "history-of-k"])
async def test_a_link_planted_in_the_store_is_never_followed_out(tmp_path: Path, planted: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.rec").write_bytes(b"precious")
    backend = open_backend(f"file://{root}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.put_record("k", b"v1", "application/octet-stream", keep_history=1)
    directory = root / kvs.id
    target = {
        ".history": directory / ".history",
        ".lock": directory / ".lock",
        "k.rec": directory / "k.rec",
        "history-of-k": directory / ".history" / "k.rec",
    }[planted]
    import shutil

    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    target.symlink_to(outside if planted != ".lock" else outside / "victim.rec")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    for n in range(3):  # refused with a library error, or done inside the store: never through the link
        with contextlib.suppress(StorageError):
            await kvs.put_record("k", f"v{n + 2}".encode(), "application/octet-stream", keep_history=1)
        with contextlib.suppress(StorageError):
            await kvs.get_history("k")
        with contextlib.suppress(StorageError):
            await kvs.delete_value("k")
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before  # nothing outside changed
    await backend.aclose()


async def test_a_rewritten_record_keeps_its_mode_and_new_ones_are_private(tmp_path: Path) -> None:
    import stat

    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.set_value("new", 1)
    path = tmp_path / kvs.id / "new.rec"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / kvs.id).stat().st_mode) == 0o700
    path.chmod(0o640)
    await kvs.set_value("new", 2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    await backend.aclose()


# -- one bad file spoils one record ----------------------------------------------


async def test_an_empty_record_file_fails_its_own_state_alone(tmp_path: Path) -> None:
    from pydantic import BaseModel

    from recoverable_state import RecoverableState

    class Count(BaseModel):
        n: int = 0

    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    for i in range(5):
        await kvs.set_value(f"s{i}", {"n": i})
    (tmp_path / kvs.id / "s2.rec").write_bytes(b"")

    async def factory() -> KeyValueStore:
        return kvs

    def states(policy: str) -> list[RecoverableState[Count]]:
        return [
            RecoverableState(
                default_state=Count(),
                persist_state_key=f"s{i}",
                persistence_enabled="explicit_only",
                persist_state_kvs_factory=factory,
                on_bad_record=policy,  # type: ignore[arg-type]
            )
            for i in range(5)
        ]

    raising = states("raise")
    with pytest.raises(RecordCorruptError, match=r"store 'jobs', key 's2'"):
        await RecoverableState.initialize_many(raising)
    assert [s.is_initialized for s in raising] == [True, True, False, True, True]
    assert [raising[i].current_value.n for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    for i in (0, 1, 3, 4):
        raising[i].current_value.n += 10
    await RecoverableState.persist_many([raising[i] for i in (0, 1, 3, 4)])  # unrelated writes land
    for i in (0, 1, 3, 4):
        await raising[i].teardown()
    assert await kvs.get_value("s4") == {"n": 14}

    quarantining = states("quarantine")
    await RecoverableState.initialize_many(quarantining)
    assert quarantining[2].current_value.n == 0
    quarantining[2].current_value.n = 7
    await quarantining[2].persist_state()
    assert await kvs.get_value("s2") == {"n": 7}  # the damaged file was replaced
    quarantine = await kvs.open_quarantine()
    assert [r.key.split("@")[0] for r in await quarantine.list_keys()] == ["s2"]
    for s in quarantining:
        await s.teardown()
    await backend.aclose()


async def test_an_empty_store_meta_file_spoils_only_its_own_store(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    good = await KeyValueStore.open(name="good", storage=backend)
    await good.set_value("k", 1)
    broken = await KeyValueStore.open(name="broken", storage=backend)
    (tmp_path / broken.id / ".store.json").write_bytes(b"")
    fresh = open_backend(f"file://{tmp_path}")
    assert await (await KeyValueStore.open(name="good", storage=fresh)).get_value("k") == 1
    await KeyValueStore.open(name="other", storage=fresh)
    assert {s.name for s in await fresh.list_stores()} == {"good", "other"}
    await backend.aclose()
    await fresh.aclose()


async def test_a_store_directory_replaced_by_a_link_is_not_used(tmp_path: Path) -> None:
    import shutil

    root, outside = tmp_path / "root", tmp_path / "outside"
    backend = open_backend(f"file://{root}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.set_value("k", 1)
    await backend.aclose()
    shutil.copytree(root / kvs.id, outside)  # a look-alike store elsewhere
    shutil.rmtree(root / kvs.id)
    (root / kvs.id).symlink_to(outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    fresh = open_backend(f"file://{root}")
    with pytest.raises(StorageError):  # StoreNotFoundError: a link is not a store
        await KeyValueStore.open(id=kvs.id, storage=fresh)
    assert "jobs" not in {s.name for s in await fresh.list_stores()}
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    await fresh.aclose()


# -- deletes among the writes of a batch ---------------------------------------------


async def test_a_damaged_record_file_is_removed_by_a_delete(tmp_path: Path) -> None:
    """A record the store cannot read counts as version 0: deleting it (expecting nothing or 0) works."""
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    for key in ("a", "b", "c"):
        await kvs.set_value(key, 1)
        (tmp_path / kvs.id / f"{key}.rec").write_bytes(b"")
    assert not await kvs.delete_record("a", expected_version=1)  # its version is unknown: not 1
    assert (tmp_path / kvs.id / "a.rec").exists()
    await kvs.delete_value("a")
    assert await kvs.delete_record("b", expected_version=0)
    assert (await kvs.put_record("c", b"new", "text/plain", expected_version=0)).applied  # replaced
    assert not (tmp_path / kvs.id / "a.rec").exists()
    assert not (tmp_path / kvs.id / "b.rec").exists()
    assert await kvs.get_value("c") == "new"
    await backend.aclose()


async def test_a_delete_that_cannot_remove_its_file_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.put_record("stuck", b"v", "text/plain", keep_history=2)
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name == "stuck.rec":
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    outcomes = await backend.write_batch(
        [
            RecordDelete(kvs.id, "stuck", 1),
            RecordWrite(kvs.id, "stuck", b"w", "text/plain", 0),
            RecordWrite(kvs.id, "other", b"o", "text/plain"),
        ]
    )
    monkeypatch.undo()
    assert isinstance(outcomes[0], StorageError) and "could not be deleted" in str(outcomes[0])
    assert outcomes[1] is outcomes[0]  # the write after it depended on it: nothing of either landed
    assert outcomes[2] == WriteOutcome(True, 1)
    record = await kvs.get_record("stuck")
    assert record is not None and (record.value, record.version) == (b"v", 1)
    assert [h.value for h in await kvs.get_history("stuck")] == [b"v"]
    await backend.aclose()


async def test_a_record_deleted_then_not_written_again_fails_the_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its delete landed and its write did not: no answer per request could tell that, so the batch raises."""
    from recoverable_state.storage import _files_batch

    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.put_record("k", b"old", "text/plain")
    await kvs.get_record("k", claim=True)  # version 2, in the claims journal
    real_write = _files_batch.write_atomically

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == "k.rec":
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(_files_batch, "write_atomically", full_disk)
    with pytest.raises(StorageError, match="may or may not have landed"):
        await backend.write_batch(
            [
                RecordDelete(kvs.id, "k", 2),
                RecordWrite(kvs.id, "k", b"new", "text/plain", 0),
                RecordWrite(kvs.id, "x", b"x", "text/plain"),
            ]
        )
    monkeypatch.undo()
    again = open_backend(f"file://{tmp_path}")  # what a reload sees: one of the two outcomes, whole
    reread = await KeyValueStore.open(id=kvs.id, storage=again)
    assert await reread.get_record("k") is None
    assert await reread.get_value("x") == "x"
    assert (await reread.put_record("k", b"new", "text/plain", expected_version=0)) == WriteOutcome(True, 1)
    await again.aclose()
    await backend.aclose()
