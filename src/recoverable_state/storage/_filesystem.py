"""File-system backend (`file:///dir`): one file per record, replaced atomically.

Layout under the root directory::

    <store id>/.store.json             {"id": ..., "name": ..., "format": 2}
    <store id>/.lock                   flock held while a batch changes the store
    <store id>/<encoded key>.rec       one record: a JSON header line, then the value
    <store id>/.history/<encoded key>/<version>.rec

A record is written to a temporary file in the same directory, fsynced, renamed
over the old one, and the directory is fsynced: after a crash (SIGKILL or power
loss) the file holds the whole old snapshot or the whole new one.

Keys become file names one to one, also on a file system that ignores case
(macOS, Windows): lower-case ASCII letters, digits, `-`, `_` and `.` stay as
they are, every other character is percent-encoded with upper-case hex (so
`Job` is `%4Aob`), and a leading `.` is encoded too. A name longer than 200
bytes is replaced by `~` and the SHA-256 of the key; no encoded key holds a
`~`, so the two kinds never meet. The real key is in each file's header.

Links: nothing is followed out of a store. Record, history and lock files are
opened with O_NOFOLLOW, directories are checked with lstat, and a link planted
in place of a record is replaced by the record, never written through.

Modes: a new record file is made private (0600) and a new directory 0700,
since state often holds tokens and cursors; a record rewritten keeps the mode
of the file it replaces, so a file made readable to a group stays so.

One bad file spoils one record: a record file whose header cannot be read is
answered with a RecordCorruptError for that key alone (the error carries the
file's bytes as `raw`); a write to that key replaces it like an absent record.
A disk that fills up in the middle of a batch fails the records that could not
be written; the others are stored and answered as such.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import heapq
import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote

import anyio.to_thread

from .._errors import RecordCorruptError, StorageError, StoreNotFoundError
from ._backend import (
    RecordInfo,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOutcome,
)
from ._contract import Pair, compare_and_set, fail_records, plan_reads, plan_writes

T = TypeVar("T")

_log = logging.getLogger("recoverable_state.storage")

_FORMAT = 2  # 1: keys kept their case and "~" in file names
_MAX_NAME = 200  # bytes of an encoded name before it is hashed (file names allow 255)
_META = ".store.json"
_LOCK = ".lock"
_HISTORY = ".history"
_SUFFIX = ".rec"
_FSYNC_THREADS = 8
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_ESCAPES = {c: f"%{c:02X}" for c in range(128) if chr(c) not in _KEEP}


@functools.lru_cache(maxsize=65536)
def encode_key(key: str) -> str:
    """The file name of `key`: one to one, whatever the keys and the file system's case rules."""
    name = key.translate(_ESCAPES)
    if not name.isascii():
        name = quote(name, safe="%-_.")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_NAME:
        name = "~" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return name + _SUFFIX


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _real_dir(path: Path) -> bool:
    """Whether `path` is a directory and not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _make_dir(path: Path) -> None:
    """Make `path` (one level) unless it is a real directory already; refuse a link."""
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        if not _real_dir(path):
            raise OSError(errno.ELOOP, "not a directory (a link or a file) in the store", str(path)) from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`.

    The new file keeps the mode of the regular file it replaces (0600 when new).
    """
    try:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else _FILE_MODE
    except FileNotFoundError:
        mode = _FILE_MODE
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, _FILE_MODE)
    try:
        if mode != _FILE_MODE:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _read_bytes(path: Path, limit: int = -1) -> bytes | None:
    """A file's bytes (its first line only, with `limit=0`); None when absent. Links are refused."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        return fh.readline() if limit == 0 else fh.read()


def _parse_header(head: bytes) -> tuple[str, str, int, datetime]:
    """A record file's header line: key, content type, version, time (ValueError when unreadable)."""
    if not head.strip():
        raise ValueError("no header line")
    try:
        meta = json.loads(head)
        return (
            meta["key"],
            meta["content_type"],
            int(meta["version"]),
            datetime.fromtimestamp(meta["updated_at"], UTC),
        )
    except (KeyError, TypeError, OverflowError, OSError) as exc:
        raise ValueError(f"header lacks {exc}") from exc


def _pack(key: str, value: bytes, content_type: str, version: int, updated_at: float) -> bytes:
    header = {"key": key, "content_type": content_type, "version": version, "updated_at": updated_at}
    return json.dumps(header, ensure_ascii=True).encode("ascii") + b"\n" + value


class FileSystemBackend(StorageBackend):
    """Stores each record as one file; a batch is written by parallel threads, then synced."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root.absolute()}"
        self._pool: ThreadPoolExecutor | None = None
        self._names: dict[str, str | None] = {}

    # -- plumbing -----------------------------------------------------------

    def _label(self, store_id: str) -> str:
        name = self._names.get(store_id)
        return name if name is not None else store_id

    def _store_dir(self, store_id: str) -> Path:
        if not store_id or "/" in store_id or store_id.startswith(".") or "\x00" in store_id:
            raise StoreNotFoundError("not a store id", store=store_id)
        path = self.root / store_id
        if store_id not in self._names:
            if not _real_dir(path) or (info := self._read_meta(path)) is None:
                raise StoreNotFoundError(f"no such store in {self.url}", store=store_id)
            self._names[store_id] = info.name
        elif not _real_dir(path):
            del self._names[store_id]
            raise StoreNotFoundError(f"no such store in {self.url} (was it dropped?)", store=store_id)
        return path

    def _read_meta(self, directory: Path) -> StoreInfo | None:
        """A store directory's id and name; None (and a warning) when its meta file is unreadable."""
        meta_path = directory / _META
        try:
            data = _read_bytes(meta_path)
            if data is None:
                return None
            meta = json.loads(data)
            info = StoreInfo(str(meta["id"]), meta["name"])
            if meta.get("format", 1) != _FORMAT:
                with self._locked(directory):
                    self._upgrade(directory, meta)
            return info
        except (ValueError, KeyError, TypeError, OSError) as exc:
            _log.warning("file store %s: skipping %s, which cannot be read (%s)", self.url, meta_path, exc)
            return None

    def _upgrade(self, directory: Path, meta: dict[str, object]) -> None:
        """Rename the files of a store written by format 1 (case kept, `~` kept) to today's names."""
        if json.loads(_read_bytes(directory / _META) or b"{}").get("format", 1) == _FORMAT:
            return  # another process upgraded it while we waited for the lock
        for path in list(directory.glob(f"*{_SUFFIX}")):
            key = _parse_header(_read_bytes(path, 0) or b"")[0]
            name = encode_key(key)
            if name != path.name:
                os.replace(path, directory / name)
                hdir = directory / _HISTORY / path.name
                if _real_dir(hdir):
                    os.replace(hdir, directory / _HISTORY / name)
        _write_atomically(directory / _META, json.dumps({**meta, "format": _FORMAT}).encode())
        _fsync_dir(directory)

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    async def _run(self, fn: Callable[[], T], store_id: str | None = None) -> T:
        def call() -> T:
            try:
                return fn()
            except OSError as exc:
                raise StorageError(
                    f"file store at {str(self.root)!r} failed: {exc}",
                    store=None if store_id is None else self._label(store_id),
                ) from exc

        return await anyio.to_thread.run_sync(call)

    def _map(self, fn: Callable[[T], object], items: Sequence[T]) -> None:
        """Run `fn` over items on a few threads: fsyncs of many files overlap."""
        if len(items) < 4:
            for item in items:
                fn(item)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="recoverable-state-fs")
        for _ in self._pool.map(fn, items):
            pass

    def _corrupt(self, path: Path, store_id: str, key: str | None, problem: object) -> RecordCorruptError:
        return RecordCorruptError(
            f"record file {str(path)!r} has no readable header ({problem})",
            store=self._label(store_id),
            key=key,
        )

    def _read_file(self, path: Path, store_id: str, key: str | None = None) -> StoredRecord | None:
        """The record in a file; None when absent; RecordCorruptError (with `raw`) when unreadable."""
        data = _read_bytes(path)
        if data is None:
            return None
        head, sep, value = data.partition(b"\n")
        try:
            found_key, content_type, version, updated_at = _parse_header(head if sep else b"")
        except ValueError as exc:
            error = self._corrupt(path, store_id, key, exc)
            error.raw = data
            raise error from exc
        return StoredRecord(found_key, value, content_type, version, updated_at)

    def _stored_version(self, path: Path) -> int:
        """The version in a record file's header; 0 when absent or unreadable (it is replaced)."""
        head = _read_bytes(path, 0)
        if head is None:
            return 0
        try:
            return _parse_header(head)[2]
        except ValueError:
            return 0

    # -- stores -------------------------------------------------------------

    def _stores(self) -> list[StoreInfo]:
        found = []
        if _real_dir(self.root) or self.root.is_dir():
            for directory in self.root.iterdir():
                if directory.name.startswith(".") or not _real_dir(directory):
                    continue
                if not (directory / _META).exists():
                    continue
                info = self._read_meta(directory)
                if info is not None:
                    self._names[info.id] = info.name
                    found.append(info)
        return sorted(found, key=lambda s: (s.name or "", s.id))

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find() -> StoreInfo:
            if id is not None:
                self._store_dir(id)
                return StoreInfo(id, self._names[id])
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked(self.root):
                for info in self._stores():
                    if info.name == name:
                        return info
                info = StoreInfo(uuid.uuid4().hex, name)
                directory = self.root / info.id
                os.mkdir(directory, _DIR_MODE)
                meta = json.dumps({"id": info.id, "name": name, "format": _FORMAT}).encode()
                _write_atomically(directory / _META, meta)
                _fsync_dir(directory)
                _fsync_dir(self.root)
                self._names[info.id] = name
                return info

        return await self._run(find)

    async def list_stores(self) -> list[StoreInfo]:
        return await self._run(self._stores)

    async def drop_store(self, store_id: str) -> None:
        def drop() -> None:
            directory = self._store_dir(store_id)
            # Renaming first makes the drop atomic for readers: the store vanishes whole.
            gone = self.root / f".dropped-{uuid.uuid4().hex}"
            os.replace(directory, gone)
            _fsync_dir(self.root)
            self._names.pop(store_id, None)
            shutil.rmtree(gone, ignore_errors=True)

        await self._run(drop, store_id)

    # -- records ------------------------------------------------------------

    @staticmethod
    def _group(store_ids: Sequence[str]) -> dict[str, list[int]]:
        """Request indexes by store."""
        by_store: dict[str, list[int]] = {}
        for i, store_id in enumerate(store_ids):
            by_store.setdefault(store_id, []).append(i)
        return by_store

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        def read() -> list[StoredRecord | StorageError | None]:
            out: list[StoredRecord | StorageError | None] = [None] * len(reads)
            for store_id, indexes in self._group([r.store_id for r in reads]).items():
                mine = [reads[i] for i in indexes]
                for i, result in zip(indexes, self._read_store(store_id, mine), strict=True):
                    out[i] = result
            return out

        return await self._run(read)

    def _read_store(self, store_id: str, reads: list[RecordRead]) -> list[StoredRecord | StorageError | None]:
        try:
            directory = self._store_dir(store_id)
        except StoreNotFoundError as exc:
            return [exc] * len(reads)
        claims = any(r.claim for r in reads)
        with self._locked(directory) if claims else contextlib.nullcontext():
            found: dict[Pair, StoredRecord] = {}
            broken: dict[str, StorageError] = {}
            for r in reads:
                pair = (store_id, r.key)
                if pair in found or r.key in broken:
                    continue
                try:
                    record = self._read_file(directory / encode_key(r.key), store_id, r.key)
                except RecordCorruptError as exc:
                    broken[r.key] = exc
                    continue
                if record is not None:
                    found[pair] = record
            results, bumped = plan_reads(reads, found, {})
            for n, r in enumerate(reads):
                if r.key in broken:
                    results[n] = broken[r.key]

            def rewrite(pair: Pair) -> None:
                rec = found[pair]
                data = _pack(rec.key, rec.value, rec.content_type, bumped[pair], rec.updated_at.timestamp())
                _write_atomically(directory / encode_key(rec.key), data)

            if bumped:
                self._map(rewrite, list(bumped))
                _fsync_dir(directory)
        return results

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        def write() -> list[WriteOutcome | StorageError]:
            outcomes: list[WriteOutcome | StorageError] = [WriteOutcome(False, 0)] * len(writes)
            for store_id, indexes in self._group([w.store_id for w in writes]).items():
                mine = [writes[i] for i in indexes]
                for i, outcome in zip(indexes, self._write_store(store_id, mine), strict=True):
                    outcomes[i] = outcome
            return outcomes

        return await self._run(write)

    def _write_store(self, store_id: str, writes: list[RecordWrite]) -> list[WriteOutcome | StorageError]:
        try:
            directory = self._store_dir(store_id)
        except StoreNotFoundError as exc:
            return [exc] * len(writes)
        now = time.time()
        with self._locked(directory):
            stored = {(store_id, w.key): self._stored_version(directory / encode_key(w.key)) for w in writes}
            plan = plan_writes(writes, stored, {})
            failed: dict[Pair, StorageError] = {}

            def put(pair: Pair) -> None:
                w, version = plan.rows[pair]
                name = encode_key(w.key)
                data = _pack(w.key, w.value, w.content_type, version, now)
                change = plan.history.get(pair)
                written: list[Path] = []
                try:
                    if change is not None:
                        hdir = directory / _HISTORY / name
                        _make_dir(directory / _HISTORY)
                        _make_dir(hdir)
                        for v, hw in change.added:
                            written.append(hdir / f"{v:020d}{_SUFFIX}")
                            hdata = data if v == version else _pack(w.key, hw.value, hw.content_type, v, now)
                            _write_atomically(written[-1], hdata)
                    _write_atomically(directory / name, data)
                except OSError as exc:
                    for path in written:  # the record was not replaced: neither are its snapshots
                        with contextlib.suppress(OSError):
                            path.unlink()
                    failed[pair] = StorageError(
                        f"the record could not be written to {str(directory / name)!r}: {exc}",
                        store=self._label(store_id),
                        key=w.key,
                    )
                    return
                if change is not None:
                    try:
                        self._trim(directory / _HISTORY / name, change.keep_total)
                    except OSError as exc:  # the record stands; old snapshots are left over
                        _log.warning("file store %s: history of %r not trimmed: %s", self.url, w.key, exc)

            self._map(put, list(plan.rows))
            _fsync_dir(directory)
        return fail_records(plan, failed)

    @staticmethod
    def _trim(hdir: Path, keep: int) -> None:
        """Delete all but the newest `keep` snapshots in a history directory, then sync it."""
        versions = sorted((p.name for p in hdir.iterdir() if p.name.endswith(_SUFFIX)), reverse=True)
        for name in versions[keep:]:
            (hdir / name).unlink(missing_ok=True)
        _fsync_dir(hdir)

    async def delete(self, store_id: str, key: str, expected_version: int | None = None) -> bool:
        def delete() -> bool:
            directory = self._store_dir(store_id)
            name = encode_key(key)
            with self._locked(directory):
                head = _read_bytes(directory / name, 0)
                if head is None:
                    return False
                try:
                    current = _parse_header(head)[2]
                except ValueError as exc:
                    if expected_version is not None:
                        raise self._corrupt(directory / name, store_id, key, exc) from exc
                    current = 0
                if not compare_and_set(expected_version, current):
                    return False
                (directory / name).unlink()
                hdir = directory / _HISTORY / name
                if _real_dir(hdir):
                    shutil.rmtree(hdir, ignore_errors=True)
                elif os.path.lexists(hdir):
                    hdir.unlink()  # a link planted there: remove the link, never its target
                _fsync_dir(directory)
                return True

        return await self._run(delete, store_id)

    def _record_info(self, path: Path, store_id: str) -> RecordInfo | None:
        """What a record file's header tells; None when it is gone, a link, or unreadable."""
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return None  # gone meanwhile, or a link: not a record
        with os.fdopen(fd, "rb") as fh:
            head = fh.readline()
            size = os.fstat(fh.fileno()).st_size - len(head)
        try:
            key, content_type, version, updated_at = _parse_header(head)
        except ValueError as exc:
            _log.warning("file store %s: %s", self.url, self._corrupt(path, store_id, None, exc))
            return None
        if encode_key(key) != path.name:
            _log.warning(
                "file store %s: skipping %s, whose header names another key (%r)", self.url, path, key
            )
            return None
        return RecordInfo(key, size, content_type, version, updated_at)

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        """Keys come from the file names (one directory scan), headers only for the page.

        A hashed name (a long key) is the one kind whose key needs its header read.
        """
        start = exclusive_start_key

        def listing() -> list[RecordInfo]:
            directory = self._store_dir(store_id)
            named: dict[str, str] = {}  # key -> file name
            headed: dict[str, RecordInfo] = {}  # what was read already, by key
            for name in os.listdir(directory):
                if name.startswith(".") or not name.endswith(_SUFFIX):
                    continue
                if name.startswith("~"):
                    info = self._record_info(directory / name, store_id)
                    if info is None:
                        continue
                    key = info.key
                    headed[key] = info
                else:
                    key = name[: -len(_SUFFIX)]
                    if "%" in key:
                        try:
                            key = unquote(key, errors="strict")
                        except UnicodeDecodeError:
                            continue  # not a name this backend writes
                    # A name this backend did not write is caught when its header is read.
                if start is None or key > start:
                    named[key] = name
            # Smallest keys first (a heap: no sort of the whole store for one page); a file
            # that turns out unreadable is skipped and the next key takes its place.
            heap = list(named)
            heapq.heapify(heap)
            infos: list[RecordInfo] = []
            while heap and (limit is None or len(infos) < limit):
                key = heapq.heappop(heap)
                info = headed.get(key) or self._record_info(directory / named[key], store_id)
                if info is not None:
                    infos.append(info)
            return infos

        return await self._run(listing, store_id)

    async def purge_store(self, store_id: str) -> None:
        def purge() -> None:
            directory = self._store_dir(store_id)
            with self._locked(directory):
                hdir = directory / _HISTORY
                if _real_dir(hdir):
                    # Renamed first, so that a later write's history never lands in a dying directory.
                    gone = directory / f".purged-{uuid.uuid4().hex}"
                    os.replace(hdir, gone)
                    shutil.rmtree(gone, ignore_errors=True)
                elif os.path.lexists(hdir):
                    hdir.unlink()  # a link planted there: remove the link, never its target
                for name in os.listdir(directory):
                    if not name.startswith(".") and name.endswith(_SUFFIX):
                        (directory / name).unlink(missing_ok=True)  # a link is removed, not followed
                _fsync_dir(directory)

        await self._run(purge, store_id)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        def history() -> list[StoredRecord]:
            hdir = self._store_dir(store_id) / _HISTORY / encode_key(key)
            if not _real_dir(hdir):
                return []
            found = []
            for path in sorted(hdir.iterdir(), reverse=True):
                with contextlib.suppress(RecordCorruptError):
                    record = self._read_file(path, store_id, key)
                    if record is not None:
                        found.append(record)
            return found

        return await self._run(history, store_id)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.shutdown)
