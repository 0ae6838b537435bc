"""File-system backend (`file:///dir`): one file per record, replaced atomically.

Layout under the root directory::

    <store id>/.store.json             {"id": ..., "name": ..., "format": 2}
    <store id>/.lock                   flock: held shared to read, exclusive to change the store
    <store id>/.claims                 the claims journal (see below)
    <store id>/<encoded key>.rec       one record: a JSON header line, then the value
    <store id>/.history/<encoded key>/<version>.rec

A record is written to a temporary file in the same directory, fsynced, renamed
over the old one, and the directory is fsynced: after a crash (SIGKILL or power
loss) the file holds the whole old snapshot or the whole new one.

Claims (fencing) do not rewrite record files: a claiming batch appends one
line per claimed record, `<new version> <file name>`, to the store's journal
`.claims` and syncs it once. While a record file exists, its version is the
larger of the version in its header and its last journal line; a write stores
`that + 1` in the header as ever. A record created afresh (absent or unreadable
before) first appends `0 <file name>`, so that claims of a deleted record never
reach its successor. The journal starts with a line naming its generation; it is
written whole (temporary file and rename) when created and when compacted, which
happens once it holds over twice as many lines as records it still raises (plus
a slack), keeping only those lines. A line cut short by a crash is ignored, and
cut off by the next process that changes the store. Each backend object keeps
the journal in memory and reads, under the lock, only what other processes
appended since; a new generation is read whole.

Keys become file names one to one, also on a file system that ignores case
(macOS, Windows): lower-case ASCII letters, digits, `-`, `_` and `.` stay as
they are, every other character is percent-encoded with upper-case hex (so
`Job` is `%4Aob`), and a leading `.` is encoded too. A name longer than 200
bytes is replaced by `~` and the SHA-256 of the key; no encoded key holds a
`~`, so the two kinds never meet. The real key is in each file's header.

Links: nothing is followed out of a store. Record, history, lock and journal
files are opened with O_NOFOLLOW, directories are checked with lstat, and a link
planted in place of a record (or of the journal) is replaced by the record (or
by a new journal at the next claim), never written through.

Modes: a new record file is made private (0600) and a new directory 0700,
since state often holds tokens and cursors; a record rewritten keeps the mode
of the file it replaces, so a file made readable to a group stays so.

One bad file spoils one record: a record file whose header cannot be read is
answered with a RecordCorruptError for that key alone (the error carries the
file's bytes as `raw`); a write to that key replaces it like an absent record.
A disk that fills up in the middle of a batch fails the records that could not
be written; the others are stored and answered as such. A claim that cannot be
made durable is cut back off the journal, and the whole read fails. A journal
line damaged on disk is skipped with a warning (its record falls back to its
header's version) rather than failing every record of the store.
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
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote

import anyio.to_thread
import pydantic_core

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
_CLAIMS = ".claims"
_CLAIMS_MAGIC = b"recoverable-state claims 1 "
_CLAIMS_SLACK = 1024  # journal lines allowed beyond twice the live ones before it is compacted
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


def _read_bytes(path: str | Path, limit: int = -1) -> bytes | None:
    """A file's bytes (its first line only, with `limit=0`); None when absent. Links are refused.

    Plain `os.read` calls: a buffered file object costs more than the read itself.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 8192 if limit == 0 else 65536):
            if limit == 0 and (end := chunk.find(b"\n")) >= 0:
                chunks.append(chunk[: end + 1])
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _parse_header(head: bytes) -> tuple[str, str, int, datetime]:
    """A record file's header line: key, content type, version, time (ValueError when unreadable)."""
    if not head.strip():
        raise ValueError("no header line")
    try:
        meta = pydantic_core.from_json(head, cache_strings="keys")  # about 5x json.loads on a header
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


_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` (fewer only when the file is shorter)."""
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _claim_lines(entries: Sequence[tuple[str, int]]) -> bytes:
    return "".join([f"{version} {name}\n" for name, version in entries]).encode("ascii")


class _ClaimsJournal:
    """One store's claims journal (`.claims`), mirrored in memory; see the module docstring.

    Every method is called with the store's lock held (exclusive where it changes
    the file) and `mutex` held, so that threads of one process share the mirror.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mutex = threading.Lock()
        self.versions: dict[str, int] = {}
        """Record file name -> the version of its last journal line (lines of 0 drop it)."""
        self.superseded: set[str] = set()
        """Names whose header this process has since written above their journal version."""
        self.generation: bytes | None = None
        """The header line of the file mirrored; None when there is no journal."""
        self.offset = 0
        """Bytes of whole lines mirrored."""
        self.lines = 0
        """Entry lines in the file."""

    def _restart(self, generation: bytes | None) -> None:
        self.versions = {}
        self.superseded = set()
        self.generation = generation
        self.offset = 0 if generation is None else len(generation)
        self.lines = 0

    def refresh(self, *, repair: bool) -> None:
        """Mirror what was appended since the last call; `repair` (exclusive lock) cuts a torn tail off."""
        try:
            # O_NONBLOCK: a FIFO planted there must not hang the store (no effect on a file).
            fd = os.open(self.path, (os.O_RDWR if repair else os.O_RDONLY) | os.O_NONBLOCK | _NOFOLLOW)
        except FileNotFoundError:
            self._restart(None)
            return
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            fd = -1
        try:
            st = os.fstat(fd) if fd >= 0 else None
            if st is None or not stat.S_ISREG(st.st_mode):
                _log.warning("claims journal %s is not a file: not followed; a claim replaces it", self.path)
                self._restart(None)
                return
            size = st.st_size
            head = os.pread(fd, 128, 0)
            end = head.find(b"\n")
            if end < 0 or not head.startswith(_CLAIMS_MAGIC):
                # Never torn (it is written whole), so damaged on disk: ignored; a claim replaces it.
                _log.warning("claims journal %s has no readable header: it is ignored", self.path)
                self._restart(None)
                return
            generation = head[: end + 1]
            if generation != self.generation or size < self.offset:
                self._restart(generation)
            if size > self.offset:
                data = _pread_all(fd, size - self.offset, self.offset)
                whole = data.rfind(b"\n") + 1
                self._mirror(data[:whole])
                self.offset += whole
                if repair and whole < len(data):  # a line torn by a crash mid-append
                    os.ftruncate(fd, self.offset)
                    os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _take(self, name: str, version: int) -> None:
        """Mirror one journal line: the record's claimed version (0: created afresh, no claim)."""
        self.superseded.discard(name)
        if version:
            self.versions[name] = version
        else:
            self.versions.pop(name, None)

    def _mirror(self, data: bytes) -> None:
        bad = 0
        lines = data.split(b"\n")
        lines.pop()  # after the last newline
        for line in lines:
            number, sep, raw = line.partition(b" ")
            if not (sep and number.isdigit() and raw.endswith(b".rec") and raw.isascii()) or b"/" in raw:
                bad += 1
                continue
            self._take(raw.decode("ascii"), int(number))
        self.lines += len(lines)
        if bad:
            _log.warning("claims journal %s: %d unreadable lines ignored", self.path, bad)

    def append(self, entries: Sequence[tuple[str, int]]) -> None:
        """Append claim lines (version 0: the record is created afresh) and make them durable."""
        if self.generation is None:
            self._rewrite({name: version for name, version in entries if version})
            return
        data = _claim_lines(entries)
        fd = os.open(self.path, os.O_WRONLY | _NOFOLLOW)
        try:
            try:
                view = memoryview(data)
                at = self.offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
                _fdatasync(fd)
            except BaseException:
                with contextlib.suppress(OSError):  # a failed claim leaves no line behind
                    os.ftruncate(fd, self.offset)
                    os.fsync(fd)
                raise
        finally:
            os.close(fd)
        self.offset += len(data)
        self.lines += len(entries)
        for name, version in entries:
            self._take(name, version)

    def _rewrite(self, versions: dict[str, int]) -> None:
        """Replace the journal by a new generation holding `versions` (atomically)."""
        generation = _CLAIMS_MAGIC + uuid.uuid4().hex.encode("ascii") + b"\n"
        body = _claim_lines(list(versions.items()))
        _write_atomically(self.path, generation + body)
        _fsync_dir(self.path.parent)
        self._restart(generation)
        self.versions = versions
        self.offset += len(body)
        self.lines = len(versions)

    def written(self, name: str, version: int) -> None:
        """Note that a record's header now holds `version`: its journal line no longer counts."""
        claimed = self.versions.get(name)
        if claimed is not None and claimed < version:
            self.superseded.add(name)

    def compact(self, header_version: Callable[[str], int | None], known: Mapping[str, int]) -> None:
        """Rewrite the journal with only the lines that still raise a record, once it grew long enough.

        `header_version(name)` reads a header (None: absent or unreadable); `known` spares that read.
        """
        if self.lines <= 2 * (len(self.versions) - len(self.superseded)) + _CLAIMS_SLACK:
            return
        keep: dict[str, int] = {}
        for name, version in self.versions.items():
            if name in self.superseded:
                continue
            header = known[name] if name in known else header_version(name)
            if header is not None and header < version:
                keep[name] = version
        try:
            self._rewrite(keep)
        except OSError as exc:  # the old journal stands, whole: compaction is tried again later
            _log.warning("claims journal %s not compacted: %s", self.path, exc)


class FileSystemBackend(StorageBackend):
    """Stores each record as one file; a batch is written by parallel threads, then synced."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root.absolute()}"
        self._pool: ThreadPoolExecutor | None = None
        self._names: dict[str, str | None] = {}
        self._journals: dict[str, _ClaimsJournal] = {}

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
    def _locked(self, directory: Path, *, shared: bool = False) -> Iterator[None]:
        """Hold the store's lock: exclusive to change it, shared to read it.

        A reader that may not create the lock file (a read-only store) reads without it.
        """
        path = directory / _LOCK
        fd: int | None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, _FILE_MODE)
        except OSError as exc:
            if not shared or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            try:
                fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
            except FileNotFoundError:
                fd = None  # nobody can have written this store since it became read-only
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def _claims(self, store_id: str, directory: Path, *, change: bool) -> Iterator[_ClaimsJournal]:
        """Lock the store (exclusive to `change` it, else shared); bring its claims journal up to date."""
        journal = self._journals.get(store_id)
        if journal is None or journal.path.parent != directory:
            journal = self._journals[store_id] = _ClaimsJournal(directory / _CLAIMS)
        with self._locked(directory, shared=not change), journal.mutex:  # always this order
            journal.refresh(repair=change)
            yield journal

    def _compact(self, journal: _ClaimsJournal, directory: Path, known: Mapping[str, int]) -> None:
        journal.compact(lambda name: self._header_version(directory / name), known)

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

    def _corrupt(
        self, path: str | Path, store_id: str, key: str | None, problem: object
    ) -> RecordCorruptError:
        return RecordCorruptError(
            f"record file {str(path)!r} has no readable header ({problem})",
            store=self._label(store_id),
            key=key,
        )

    def _read_file(self, path: str | Path, store_id: str, key: str | None = None) -> StoredRecord | None:
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

    def _header_version(self, path: Path) -> int | None:
        """The version in a record file's header; None when absent or unreadable (it is replaced)."""
        head = _read_bytes(path, 0)
        if head is None:
            return None
        try:
            return _parse_header(head)[2]
        except ValueError:
            return None

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
            self._journals.pop(store_id, None)
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
        with self._claims(store_id, directory, change=claims) as journal:
            found: dict[Pair, StoredRecord] = {}
            broken: dict[str, StorageError] = {}
            headers: dict[str, int] = {}  # file name -> header version, of the records read
            claimed = journal.versions
            base = f"{directory}{os.sep}"  # string paths: a Path per file costs as much as reading it
            for r in reads:
                pair = (store_id, r.key)
                if pair in found or r.key in broken:
                    continue
                name = encode_key(r.key)
                try:
                    record = self._read_file(base + name, store_id, r.key)
                except RecordCorruptError as exc:
                    broken[r.key] = exc
                    continue
                if record is not None:
                    headers[name] = record.version
                    if (version := claimed.get(name, 0)) > record.version:
                        record = record._replace(version=version)
                    found[pair] = record
            results, bumped = plan_reads(reads, found, {})
            for n, r in enumerate(reads):
                if r.key in broken:
                    results[n] = broken[r.key]
            if bumped:  # one append and one sync for the whole batch: no record file is rewritten
                journal.append([(encode_key(key), version) for (_, key), version in bumped.items()])
                self._compact(journal, directory, headers)
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
        with self._claims(store_id, directory, change=True) as journal:
            stored: dict[Pair, int] = {}
            stale: set[Pair] = set()  # absent (or unreadable) records whose old claims must end first
            for w in writes:
                pair = (store_id, w.key)
                if pair in stored:
                    continue
                name = encode_key(w.key)
                header = self._header_version(directory / name)
                claimed = journal.versions.get(name, 0)
                if header is None:
                    stored[pair] = 0
                    if claimed:
                        stale.add(pair)
                else:
                    stored[pair] = max(header, claimed)
            plan = plan_writes(writes, stored, {})
            if stale := {pair for pair in stale if pair in plan.rows}:
                journal.append([(encode_key(key), 0) for _, key in stale])
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
            for pair, (w, version) in plan.rows.items():
                if pair not in failed:
                    journal.written(encode_key(w.key), version)
            self._compact(journal, directory, {})
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
            with self._claims(store_id, directory, change=True) as journal:
                head = _read_bytes(directory / name, 0)
                if head is None:
                    return False
                try:
                    current = max(_parse_header(head)[2], journal.versions.get(name, 0))
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
            with self._claims(store_id, directory, change=False) as journal:
                return [
                    info
                    if (v := journal.versions.get(encode_key(info.key), 0)) <= info.version
                    else info._replace(version=v)
                    for info in page(directory)
                ]

        def page(directory: Path) -> list[RecordInfo]:
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
                (directory / _CLAIMS).unlink(missing_ok=True)  # its records are gone
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
