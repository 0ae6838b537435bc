"""The file store's claims journal: claims fence like before, without rewriting record files.

A claim appends `<version> <file name>` to `<store>/.claims`; a record's version
is the larger of its header's and its last journal line's. These tests check the
fencing through the backend's public batch API, across backend objects and
processes sharing one directory, and the journal's own dangers: a line torn by
SIGKILL, a link planted at `.claims`, compaction, and deleted records coming back.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recoverable_state import StorageError
from recoverable_state.storage import (
    MemoryBackend,
    RecordDelete,
    RecordRead,
    RecordWrite,
    StorageBackend,
    WriteOutcome,
    _files_claims,
    open_backend,
)

pytestmark = pytest.mark.anyio

T = "application/octet-stream"
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
async def files(root: Path) -> AsyncIterator[StorageBackend]:
    backend = open_backend(f"file://{root}")
    yield backend
    await backend.aclose()


async def put(
    backend: StorageBackend, store: str, key: str, value: bytes, expected: int | None = None
) -> WriteOutcome:
    (outcome,) = await backend.write_batch([RecordWrite(store, key, value, T, expected)])
    assert isinstance(outcome, WriteOutcome), outcome
    return outcome


async def delete(backend: StorageBackend, store: str, key: str, expected: int | None = None) -> bool:
    (outcome,) = await backend.write_batch([RecordDelete(store, key, expected)])
    assert isinstance(outcome, WriteOutcome), outcome
    return outcome.applied


async def claim(backend: StorageBackend, store: str, *keys: str) -> list[int | None]:
    """Claim each key in one batch; the version each read answered (None: absent)."""
    found = await backend.read_batch([RecordRead(store, key, claim=True) for key in keys])
    versions: list[int | None] = []
    for record in found:
        assert not isinstance(record, StorageError), record
        versions.append(None if record is None else record.version)
    return versions


async def version_of(backend: StorageBackend, store: str, key: str) -> int | None:
    (record,) = await backend.read_batch([RecordRead(store, key)])
    assert not isinstance(record, StorageError), record
    return None if record is None else record.version


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def journal_lines(root: Path, store: str) -> list[bytes]:
    """The entry lines of a store's journal (its generation line left out)."""
    return (root / store / ".claims").read_bytes().splitlines()[1:]


async def test_a_claim_fences_the_older_version_and_the_claimed_one_writes(files: StorageBackend) -> None:
    store = (await files.open_store(name="jobs")).id
    assert await put(files, store, "a", b"a1") == WriteOutcome(True, 1)
    assert await claim(files, store, "a") == [2]
    assert await put(files, store, "a", b"stale", expected=1) == WriteOutcome(False, 2)
    assert await put(files, store, "a", b"a2", expected=2) == WriteOutcome(True, 3)
    (record,) = await files.read_batch([RecordRead(store, "a")])
    assert record is not None and not isinstance(record, StorageError)
    assert (record.version, record.value) == (3, b"a2")


async def test_a_claim_rewrites_no_record_file_and_appends_one_line_per_record(
    files: StorageBackend, root: Path
) -> None:
    store = (await files.open_store(name="jobs")).id
    for key in ("a", "b", "c"):
        await put(files, store, key, key.encode())
    before = {p.name: os.stat(p).st_ino for p in (root / store).glob("*.rec")}
    assert await claim(files, store, "a", "b", "c", "a") == [2, 2, 2, 3]
    assert {p.name: os.stat(p).st_ino for p in (root / store).glob("*.rec")} == before
    assert sorted(journal_lines(root, store)) == [b"2 b.rec", b"2 c.rec", b"3 a.rec"]
    assert stat.S_IMODE(os.stat(root / store / ".claims").st_mode) == 0o600


async def test_two_backends_on_one_directory_see_each_others_claims(root: Path) -> None:
    first, second = open_backend(f"file://{root}"), open_backend(f"file://{root}")
    try:
        store = (await first.open_store(name="jobs")).id
        await put(first, store, "a", b"a1")
        assert await version_of(first, store, "a") == 1  # the first backend mirrors the journal now
        assert await claim(second, store, "a") == [2]
        assert await put(first, store, "a", b"stale", expected=1) == WriteOutcome(False, 2)
        assert [info.version for info in await first.list_records(store)] == [2]
        assert await delete(first, store, "a", 1) is False
        assert await claim(first, store, "a") == [3]
        assert await put(second, store, "a", b"stale", expected=2) == WriteOutcome(False, 3)
        assert await put(second, store, "a", b"a2", expected=3) == WriteOutcome(True, 4)
        assert await version_of(first, store, "a") == 4
    finally:
        await first.aclose()
        await second.aclose()


async def test_versions_survive_reopening_the_backend(root: Path) -> None:
    backend = open_backend(f"file://{root}")
    store = (await backend.open_store(name="jobs")).id
    await put(backend, store, "a", b"a1")
    assert await claim(backend, store, "a") == [2]
    assert await claim(backend, store, "a") == [3]
    await backend.aclose()
    again = open_backend(f"file://{root}")
    try:
        assert await version_of(again, store, "a") == 3
        assert await put(again, store, "a", b"stale", expected=2) == WriteOutcome(False, 3)
        assert await put(again, store, "a", b"a2", expected=3) == WriteOutcome(True, 4)
    finally:
        await again.aclose()


async def test_claims_of_a_deleted_record_never_reach_the_record_made_again(root: Path) -> None:
    first, second = open_backend(f"file://{root}"), open_backend(f"file://{root}")
    try:
        store = (await first.open_store(name="jobs")).id
        await put(first, store, "a", b"a1")
        assert await claim(first, store, "a") == [2]
        assert await claim(first, store, "a") == [3]
        assert await delete(first, store, "a", 3) is True
        assert await put(first, store, "a", b"new", expected=0) == WriteOutcome(True, 1)
        assert await version_of(second, store, "a") == 1
        assert await put(second, store, "a", b"new2", expected=1) == WriteOutcome(True, 2)
    finally:
        await first.aclose()
        await second.aclose()
    fresh = open_backend(f"file://{root}")  # reads the whole journal, reset line included
    try:
        assert await version_of(fresh, store, "a") == 2
    finally:
        await fresh.aclose()


async def test_a_store_without_a_journal_keeps_working(files: StorageBackend, root: Path) -> None:
    store = (await files.open_store(name="jobs")).id
    await put(files, store, "a", b"a1")
    await put(files, store, "a", b"a2")
    assert not (root / store / ".claims").exists()  # writes alone never make one
    assert await version_of(files, store, "a") == 2
    assert await claim(files, store, "a") == [3]
    assert (root / store / ".claims").exists()


async def test_a_line_torn_by_a_crash_is_ignored_then_cut_off(files: StorageBackend, root: Path) -> None:
    store = (await files.open_store(name="jobs")).id
    await put(files, store, "a", b"a1")
    assert await claim(files, store, "a") == [2]
    append_bytes(root / store / ".claims", b"99 a.rec-a-long-torn-line")  # SIGKILL mid-append: no newline
    reader = open_backend(f"file://{root}")
    try:
        assert await version_of(reader, store, "a") == 2
        assert [info.version for info in await reader.list_records(store)] == [2]
        assert await claim(reader, store, "a") == [3]
    finally:
        await reader.aclose()
    assert journal_lines(root, store) == [b"2 a.rec", b"3 a.rec"]
    assert await version_of(files, store, "a") == 3


async def test_a_link_planted_at_the_journal_is_never_followed(
    files: StorageBackend, root: Path, tmp_path: Path
) -> None:
    store = (await files.open_store(name="jobs")).id
    await put(files, store, "a", b"a1")
    outside = tmp_path / "outside"
    planted = _files_claims.CLAIMS_MAGIC + b"x\n50 a.rec\n"
    outside.write_bytes(planted)
    (root / store / ".claims").symlink_to(outside)
    reader = open_backend(f"file://{root}")
    try:
        assert await version_of(reader, store, "a") == 1  # the link's claims are not taken
        assert await claim(reader, store, "a") == [2]
    finally:
        await reader.aclose()
    assert outside.read_bytes() == planted  # never written through
    journal = root / store / ".claims"
    assert stat.S_ISREG(os.lstat(journal).st_mode)
    assert stat.S_IMODE(os.lstat(journal).st_mode) == 0o600
    assert await put(files, store, "a", b"stale", expected=1) == WriteOutcome(False, 2)


async def test_a_fifo_planted_at_the_journal_hangs_nothing(files: StorageBackend, root: Path) -> None:
    store = (await files.open_store(name="jobs")).id
    await put(files, store, "a", b"a1")
    os.mkfifo(root / store / ".claims", 0o600)
    with anyio.fail_after(10):
        assert await version_of(files, store, "a") == 1
        assert await claim(files, store, "a") == [2]
    assert stat.S_ISREG(os.lstat(root / store / ".claims").st_mode)
    assert await put(files, store, "a", b"stale", expected=1) == WriteOutcome(False, 2)


async def test_a_failed_claim_leaves_no_line_and_no_version_behind(
    files: StorageBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = (await files.open_store(name="jobs")).id
    await put(files, store, "a", b"a1")
    assert await claim(files, store, "a") == [2]  # the journal exists: the next claim appends

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_files_claims, "fdatasync", no_space)
    with pytest.raises(StorageError, match="No space left"):
        await files.read_batch([RecordRead(store, "a", claim=True)])
    monkeypatch.undo()
    assert journal_lines(root, store) == [b"2 a.rec"]
    assert await version_of(files, store, "a") == 2
    reader = open_backend(f"file://{root}")
    try:
        assert await version_of(reader, store, "a") == 2
    finally:
        await reader.aclose()
    assert await put(files, store, "a", b"a2", expected=2) == WriteOutcome(True, 3)


async def test_compaction_keeps_only_claims_that_still_raise_a_record(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_files_claims, "CLAIMS_SLACK", 4)
    first, second = open_backend(f"file://{root}"), open_backend(f"file://{root}")
    try:
        store = (await first.open_store(name="jobs")).id
        keys = [f"k{i}" for i in range(5)]
        await first.write_batch([RecordWrite(store, key, b"v", T) for key in keys])
        for round_ in range(2, 12):
            assert await claim(first, store, *keys) == [round_] * 5
            # Never more than twice the live lines, plus the slack, plus the batch just appended.
            assert len(journal_lines(root, store)) <= 2 * 5 + 4 + 5
        await put(first, store, "k0", b"w")  # its header now holds 12: its claim line is dropped
        await delete(first, store, "k1")  # gone: dropped too
        for n in range(20):  # the other backend's claims grow the journal until it compacts
            assert await claim(second, store, "k2") == [12 + n]
        lines = journal_lines(root, store)
        assert not any(line.endswith((b" k0.rec", b" k1.rec")) for line in lines), lines
        assert len(lines) <= 2 * 3 + 4 + 1
        assert await version_of(second, store, "k0") == 12
        assert await version_of(second, store, "k1") is None
        assert [await version_of(first, store, key) for key in keys[2:]] == [31, 11, 11]
    finally:
        await first.aclose()
        await second.aclose()


# -- random sequences against the memory backend --------------------------------

KEYS = ["a", "b", "c"]

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("claim"), st.integers(0, 1), st.lists(st.sampled_from(KEYS), min_size=1, max_size=4)
        ),
        st.tuples(st.just("read"), st.integers(0, 1), st.sampled_from(KEYS)),
        st.tuples(
            st.just("write"),
            st.integers(0, 1),
            st.sampled_from(KEYS),
            st.sampled_from(["any", "current", "stale", "absent"]),
        ),
        st.tuples(st.just("delete"), st.integers(0, 1), st.sampled_from(KEYS), st.booleans()),
        st.tuples(st.just("list"), st.integers(0, 1)),
        st.tuples(st.just("reopen"), st.integers(0, 1)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
async def test_random_claims_writes_and_deletes_match_the_memory_store(
    steps: list[tuple[object, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_files_claims, "CLAIMS_SLACK", 2)  # compact often
    model = MemoryBackend()
    model_store = (await model.open_store(name="jobs")).id
    with tempfile.TemporaryDirectory() as tmp:
        url = f"file://{tmp}/files"
        backends = [open_backend(url), open_backend(url)]  # two processes' views of one directory
        store = (await backends[0].open_store(name="jobs")).id
        try:
            for n, step in enumerate(steps):
                kind, who = step[0], int(step[1])  # type: ignore[call-overload]
                files = backends[who]
                if kind == "claim":
                    keys = list(step[2])  # type: ignore[call-overload]
                    assert await claim(files, store, *keys) == await claim(model, model_store, *keys), step
                elif kind == "read":
                    key = str(step[2])
                    assert await version_of(files, store, key) == await version_of(model, model_store, key)
                elif kind == "write":
                    key, how = str(step[2]), step[3]
                    current = await version_of(model, model_store, key) or 0
                    expected = {"any": None, "current": current, "stale": current - 1, "absent": 0}[str(how)]
                    value = f"{key}{n}".encode()
                    assert await put(files, store, key, value, expected) == await put(
                        model, model_store, key, value, expected
                    ), step
                elif kind == "delete":
                    key = str(step[2])
                    expected = (await version_of(model, model_store, key)) if step[3] else None
                    assert await delete(files, store, key, expected) == await delete(
                        model, model_store, key, expected
                    ), step
                elif kind == "list":
                    got = [(i.key, i.version) for i in await files.list_records(store)]
                    assert got == [(i.key, i.version) for i in await model.list_records(model_store)], step
                else:
                    await files.aclose()
                    backends[who] = open_backend(url)
            for key in KEYS:  # values too, through a backend that reads the journal whole
                fresh = open_backend(url)
                try:
                    (got,) = await fresh.read_batch([RecordRead(store, key)])
                    (want,) = await model.read_batch([RecordRead(model_store, key)])
                    assert (got is None) == (want is None), key
                    if got is not None and want is not None:
                        assert not isinstance(got, StorageError) and not isinstance(want, StorageError)
                        assert (got.version, got.value) == (want.version, want.value), key
                finally:
                    await fresh.aclose()
        finally:
            for backend in backends:
                await backend.aclose()


# -- real processes ---------------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import sys

    import anyio

    from recoverable_state.storage import RecordRead, open_backend


    async def main(url: str, store: str, rounds: int) -> None:
        backend = open_backend(url)
        n = 0
        while rounds < 0 or n < rounds:
            found = await backend.read_batch([RecordRead(store, f"k{i}", claim=True) for i in range(50)])
            print(max(r.version for r in found), flush=True)
            n += 1
        await backend.aclose()


    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


def run_claimer(tmp_path: Path, url: str, store: str, rounds: int) -> subprocess.Popen[str]:
    script = tmp_path / "claimer.py"
    script.write_text(CLAIMER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(script), url, store, str(rounds)], stdout=subprocess.PIPE, text=True, env=env
    )


async def test_a_claim_in_another_process_fences_this_one(
    files: StorageBackend, root: Path, tmp_path: Path
) -> None:
    store = (await files.open_store(name="jobs")).id
    await files.write_batch([RecordWrite(store, f"k{i}", b"v", T) for i in range(50)])
    assert await version_of(files, store, "k0") == 1
    claimer = run_claimer(tmp_path, f"file://{root}", store, 1)
    out, _ = claimer.communicate(timeout=60)
    assert claimer.returncode == 0 and out.split() == ["2"]
    assert await put(files, store, "k0", b"stale", expected=1) == WriteOutcome(False, 2)
    assert await put(files, store, "k0", b"mine", expected=2) == WriteOutcome(True, 3)


async def test_a_claimer_killed_mid_claim_leaves_a_readable_store(
    files: StorageBackend, root: Path, tmp_path: Path
) -> None:
    store = (await files.open_store(name="jobs")).id
    await files.write_batch([RecordWrite(store, f"k{i}", f"v{i}".encode(), T) for i in range(50)])
    claimer = run_claimer(tmp_path, f"file://{root}", store, -1)
    try:
        assert claimer.stdout is not None
        seen = [int(claimer.stdout.readline()) for _ in range(5)]
    finally:
        claimer.send_signal(signal.SIGKILL)
        claimer.wait(timeout=30)
    assert claimer.returncode == -signal.SIGKILL
    assert seen == sorted(seen) and seen[0] >= 2
    reader = open_backend(f"file://{root}")
    try:
        found = await reader.read_batch([RecordRead(store, f"k{i}", claim=True) for i in range(50)])
        for i, record in enumerate(found):
            assert record is not None and not isinstance(record, StorageError)
            assert record.value == f"v{i}".encode()
            assert record.version > seen[-1]  # every claim it was told of still fences
        # And the store goes on: the claimed version writes, an older one does not.
        top = found[0]
        assert top is not None and not isinstance(top, StorageError)
        v = top.version
        assert await put(reader, store, "k0", b"w", expected=v - 1) == WriteOutcome(False, v)
        assert await put(reader, store, "k0", b"w", expected=v) == WriteOutcome(True, v + 1)
    finally:
        await reader.aclose()
