"""File-system backend (`file:///dir`): one file per record, replaced atomically.

Layout under the root directory::

    <store id>/.store.json             {"id": ..., "name": ...}
    <store id>/.lock                   flock held while a batch changes the store
    <store id>/<encoded key>.rec       one record: a JSON header line, then the value
    <store id>/.history/<encoded key>/<version>.rec

A record is written to a temporary file in the same directory, fsynced, renamed
over the old one, and the directory is fsynced: after a crash (SIGKILL or power
loss) the file holds the whole old snapshot or the whole new one. Keys are
percent-encoded into file names (a key can never name a path outside its store);
a name that would be too long is replaced by a hash, the real key is in the header.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

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

T = TypeVar("T")

_SAFE = "-_"  # with letters, digits and "." these stay as they are
_MAX_NAME = 200  # bytes of an encoded name before it is hashed (file names allow 255)
_META = ".store.json"
_LOCK = ".lock"
_HISTORY = ".history"
_SUFFIX = ".rec"
_FSYNC_THREADS = 8


def encode_key(key: str) -> str:
    """A file name for `key`: safe characters kept, the rest percent-encoded, long ones hashed."""
    name = quote(key, safe=_SAFE)
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_NAME:
        name = "~" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return name + _SUFFIX


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
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


def _parse_header(head: bytes, path: Path, store_id: str) -> tuple[str, str, int, datetime]:
    """A record file's header line: key, content type, version, time; or RecordCorruptError."""
    try:
        if not head:
            raise ValueError("no header line")
        meta = json.loads(head)
        return (
            meta["key"],
            meta["content_type"],
            int(meta["version"]),
            datetime.fromtimestamp(meta["updated_at"], UTC),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordCorruptError(
            f"record file {str(path)!r} has no readable header ({exc})", store=store_id
        ) from exc


def _pack(key: str, value: bytes, content_type: str, version: int, updated_at: float) -> bytes:
    header = {"key": key, "content_type": content_type, "version": version, "updated_at": updated_at}
    return json.dumps(header, ensure_ascii=True).encode("ascii") + b"\n" + value


class FileSystemBackend(StorageBackend):
    """Stores each record as one file; a batch is written by parallel threads, then synced."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root)
        self.url = f"file://{self.root.absolute()}"
        self._pool: ThreadPoolExecutor | None = None

    # -- plumbing -----------------------------------------------------------

    def _store_dir(self, store_id: str) -> Path:
        if not store_id or "/" in store_id or store_id.startswith(".") or "\x00" in store_id:
            raise StoreNotFoundError("not a store id", store=store_id)
        path = self.root / store_id
        if not (path / _META).is_file():
            raise StoreNotFoundError(f"no such store in {self.url}", store=store_id)
        return path

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    async def _run(self, fn: Callable[[], T]) -> T:
        def call() -> T:
            try:
                return fn()
            except OSError as exc:
                raise StorageError(f"file store at {str(self.root)!r} failed: {exc}") from exc

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

    def _read_file(self, path: Path, store_id: str) -> StoredRecord | None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        head, sep, value = data.partition(b"\n")
        key, content_type, version, updated_at = _parse_header(head if sep else b"", path, store_id)
        return StoredRecord(key, value, content_type, version, updated_at)

    def _stored_version(self, path: Path, store_id: str) -> int:
        try:
            with open(path, "rb") as fh:
                head = fh.readline()
        except FileNotFoundError:
            return 0
        return _parse_header(head, path, store_id)[2]

    # -- stores -------------------------------------------------------------

    def _stores(self) -> list[StoreInfo]:
        found = []
        if self.root.is_dir():
            for meta in self.root.glob(f"*/{_META}"):
                info = json.loads(meta.read_bytes())
                found.append(StoreInfo(info["id"], info["name"]))
        return sorted(found, key=lambda s: (s.name or "", s.id))

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find() -> StoreInfo:
            if id is not None:
                meta = json.loads((self._store_dir(id) / _META).read_bytes())
                return StoreInfo(meta["id"], meta["name"])
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked(self.root):
                for info in self._stores():
                    if info.name == name:
                        return info
                info = StoreInfo(uuid.uuid4().hex, name)
                directory = self.root / info.id
                directory.mkdir()
                meta = json.dumps({"id": info.id, "name": name}).encode()
                _write_atomically(directory / _META, meta)
                _fsync_dir(directory)
                _fsync_dir(self.root)
                return info

        return await self._run(find)

    async def list_stores(self) -> list[StoreInfo]:
        return await self._run(self._stores)

    async def drop_store(self, store_id: str) -> None:
        def drop() -> None:
            import shutil

            directory = self._store_dir(store_id)
            # Renaming first makes the drop atomic for readers: the store vanishes whole.
            gone = self.root / f".dropped-{uuid.uuid4().hex}"
            os.replace(directory, gone)
            _fsync_dir(self.root)
            shutil.rmtree(gone, ignore_errors=True)

        await self._run(drop)

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
                try:
                    directory = self._store_dir(store_id)
                except StoreNotFoundError as exc:
                    for i in indexes:
                        out[i] = exc
                    continue
                claims = any(reads[i].claim for i in indexes)
                with self._locked(directory) if claims else contextlib.nullcontext():
                    current: dict[str, StoredRecord | None] = {}
                    claimed: set[str] = set()
                    for i in indexes:
                        key = reads[i].key
                        if key not in current:
                            current[key] = self._read_file(directory / encode_key(key), store_id)
                        rec = current[key]
                        if rec is not None and reads[i].claim:  # one after another, as asked
                            rec = current[key] = rec._replace(version=rec.version + 1)
                            claimed.add(key)
                        out[i] = rec
                    if claims:
                        changed = [r for k, r in current.items() if r is not None and k in claimed]

                        def rewrite(rec: StoredRecord, directory: Path = directory) -> None:
                            data = _pack(
                                rec.key, rec.value, rec.content_type, rec.version, rec.updated_at.timestamp()
                            )
                            _write_atomically(directory / encode_key(rec.key), data)

                        self._map(rewrite, changed)
                        _fsync_dir(directory)
            return out

        return await self._run(read)

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        def write() -> list[WriteOutcome | StorageError]:
            outcomes: list[WriteOutcome | StorageError | None] = [None] * len(writes)
            for store_id, indexes in self._group([w.store_id for w in writes]).items():
                try:
                    directory = self._store_dir(store_id)
                except StoreNotFoundError as exc:
                    for i in indexes:
                        outcomes[i] = exc
                    continue
                with self._locked(directory):
                    self._write_store(directory, store_id, writes, indexes, outcomes)
            return [o for o in outcomes if o is not None]

        return await self._run(write)

    def _write_store(
        self,
        directory: Path,
        store_id: str,
        writes: Sequence[RecordWrite],
        indexes: list[int],
        outcomes: list[WriteOutcome | StorageError | None],
    ) -> None:
        now = time.time()
        stored: dict[str, int] = {}
        last: dict[str, bytes] = {}  # the final content of each record file
        snapshots: dict[str, list[tuple[int, bytes, int]]] = {}  # key: (version, data, keep)
        for i in indexes:
            w = writes[i]
            if w.key not in stored:
                stored[w.key] = self._stored_version(directory / encode_key(w.key), store_id)
            current = stored[w.key]
            if w.expected_version is not None and w.expected_version != current:
                outcomes[i] = WriteOutcome(applied=False, version=current)
                continue
            stored[w.key] = current + 1
            data = _pack(w.key, w.value, w.content_type, current + 1, now)
            last[w.key] = data
            if w.keep_history > 0:
                snapshots.setdefault(w.key, []).append((current + 1, data, w.keep_history))
            outcomes[i] = WriteOutcome(applied=True, version=current + 1)

        def put(key: str) -> None:
            name = encode_key(key)
            _write_atomically(directory / name, last[key])
            new = snapshots.get(key)
            if new:
                hdir = directory / _HISTORY / name
                hdir.mkdir(parents=True, exist_ok=True)
                existing = sorted(int(p.stem) for p in hdir.glob(f"*{_SUFFIX}"))
                # Keep and trim one write after another, as the writes were asked for.
                survivors = list(existing)
                for version, _, keep in new:
                    survivors = [*survivors, version][-keep:]
                for version, data, _ in new:
                    if version in survivors:
                        _write_atomically(hdir / f"{version:020d}{_SUFFIX}", data)
                for version in set(existing) - set(survivors):
                    (hdir / f"{version:020d}{_SUFFIX}").unlink(missing_ok=True)
                _fsync_dir(hdir)

        self._map(put, list(last))
        _fsync_dir(directory)

    async def delete(self, store_id: str, key: str, expected_version: int | None = None) -> bool:
        def delete() -> bool:
            import shutil

            directory = self._store_dir(store_id)
            name = encode_key(key)
            with self._locked(directory):
                current = self._stored_version(directory / name, store_id)
                if current == 0 or (expected_version is not None and current != expected_version):
                    return False
                (directory / name).unlink()
                shutil.rmtree(directory / _HISTORY / name, ignore_errors=True)
                _fsync_dir(directory)
                return True

        return await self._run(delete)

    async def list_records(self, store_id: str) -> list[RecordInfo]:
        def listing() -> list[RecordInfo]:
            directory = self._store_dir(store_id)
            infos = []
            for path in directory.glob(f"*{_SUFFIX}"):
                if path.name.startswith("."):
                    continue
                with open(path, "rb") as fh:
                    head = fh.readline()
                    size = os.fstat(fh.fileno()).st_size - len(head)
                key, content_type, version, updated_at = _parse_header(head, path, store_id)
                infos.append(RecordInfo(key, size, content_type, version, updated_at))
            return sorted(infos, key=lambda r: r.key)

        return await self._run(listing)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        def history() -> list[StoredRecord]:
            hdir = self._store_dir(store_id) / _HISTORY / encode_key(key)
            if not hdir.is_dir():
                return []
            found = [self._read_file(p, store_id) for p in sorted(hdir.iterdir(), reverse=True)]
            return [r for r in found if r is not None]

        return await self._run(history)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.shutdown)
