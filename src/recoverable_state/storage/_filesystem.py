"""File-system backend (`file:///dir`): one file per record, replaced atomically.

Layout under the root directory::

    <store id>/.store.json             {"id": ..., "name": ..., "format": 2}
    <store id>/.lock                   flock: held shared to read, exclusive to change the store
    <store id>/.claims                 the claims journal (`_files_claims.py`)
    <store id>/<encoded key>.rec       one record: a JSON header line, then the value
    <store id>/.history/<encoded key>/<version>.rec
    <store id>/.deltas/<encoded key>.rec   the record's deltas, a log of frames (`_files_deltas.py`)

A record is written to a temporary file in the same directory, fsynced, renamed
over the old one, and the directory is fsynced: after a crash (SIGKILL or power
loss) the file holds the whole old snapshot or the whole new one. How keys
become file names, and the file I/O that follows no link, is `_files_io.py`; a
batch under its stores' locks is `_files_batch.py`.

Claims (fencing) do not rewrite record files: a claiming batch appends a line
per record to the store's journal and syncs it once (see `_files_claims.py`).
Appends do not either: a delta goes to the record's log beside it, and the
record's version is the largest of its header's, its last claim's and its last
delta's. A listing counts a record's size as its snapshot's value plus its deltas'.

Links: nothing is followed out of a store. Record, history, lock and journal
files are opened with O_NOFOLLOW, directories are checked with lstat, and a link
planted in place of a record (or of the journal) is replaced by the record (or
by a new journal at the next claim), never written through.

Modes: a new record file is made private (0600) and a new directory 0700,
since state often holds tokens and cursors; a record rewritten keeps the mode
of the file it replaces, so a file made readable to a group stays so.

One bad file spoils one record: a record file whose header cannot be read is
answered with a RecordCorruptError for that key alone (the error carries the
file's bytes as `raw`); a write to that key replaces it like an absent record,
and a delete removes it. A disk that fills up in the middle of a batch fails
the records that could not be written; the others are stored and answered as
such. A claim that cannot be made durable is cut back off the journal, and the
whole read fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import anyio.to_thread

from .._errors import RecordCorruptError, StorageError, StoreNotFoundError
from .._forks import watch_forks
from ._backend import Durability, RecordInfo, StoredRecord, StoreInfo
from ._contract import Pair, WritePlan
from ._files_batch import FileBatch
from ._files_claims import CLAIMS, ClaimsJournal
from ._files_deltas import DELTAS
from ._files_io import (
    DIR_MODE,
    FORMAT,
    HISTORY,
    META,
    SUFFIX,
    close_inherited_locks,
    encode_key,
    fsync_dir,
    locked,
    make_private_dirs,
    parse_header,
    read_bytes,
    real_dir,
    remove_dir,
    write_atomically,
)
from ._files_listing import list_page, with_deltas
from ._transactional import TransactionalBackend

T = TypeVar("T")

_log = logging.getLogger("recoverable_state.storage")

_FSYNC_THREADS = 8


class FileSystemBackend(TransactionalBackend[FileBatch]):
    """Stores each record as one file; a batch is written by parallel threads, then synced."""

    keeps_deltas = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root.absolute()}"
        self._pool: ThreadPoolExecutor | None = None
        self._names: dict[str, str | None] = {}
        self._journals: dict[str, ClaimsJournal] = {}
        watch_forks(self)

    # -- fork (see _forks.py) -------------------------------------------------

    def after_fork_in_child(self) -> None:
        """No lock the parent held, no journal mirror it was updating, no pool whose threads are gone."""
        close_inherited_locks()
        self._journals = {}  # each made again, with a free mutex, and read from its file
        self._pool = None

    # -- plumbing -----------------------------------------------------------

    def _label(self, store_id: str) -> str:
        name = self._names.get(store_id)
        return name if name is not None else store_id

    def _store_dir(self, store_id: str) -> Path:
        if not store_id or "/" in store_id or store_id.startswith(".") or "\x00" in store_id:
            raise StoreNotFoundError("not a store id", store=store_id)
        path = self.root / store_id
        if store_id not in self._names:
            if not real_dir(path) or (info := self._read_meta(path)) is None:
                raise StoreNotFoundError(f"no such store in {self.url}", store=store_id)
            self._names[store_id] = info.name
        elif not real_dir(path):
            del self._names[store_id]
            raise StoreNotFoundError(f"no such store in {self.url} (was it dropped?)", store=store_id)
        return path

    def _read_meta(self, directory: Path) -> StoreInfo | None:
        """A store directory's id and name; None (and a warning) when its meta file is unreadable."""
        meta_path = directory / META
        try:
            data = read_bytes(meta_path)
            if data is None:
                return None
            meta = json.loads(data)
            info = StoreInfo(str(meta["id"]), meta["name"])
            if meta.get("format", 1) != FORMAT:
                with locked(directory):
                    self._upgrade(directory, meta)
            return info
        except (ValueError, KeyError, TypeError, OSError) as exc:
            _log.warning("file store %s: skipping %s, which cannot be read (%s)", self.url, meta_path, exc)
            return None

    def _upgrade(self, directory: Path, meta: dict[str, object]) -> None:
        """Rename the files of a store written by format 1 (case kept, `~` kept) to today's names."""
        if json.loads(read_bytes(directory / META) or b"{}").get("format", 1) == FORMAT:
            return  # another process upgraded it while we waited for the lock
        for path in list(directory.glob(f"*{SUFFIX}")):
            key = parse_header(read_bytes(path, 0) or b"")[0]
            name = encode_key(key)
            if name != path.name:
                os.replace(path, directory / name)
                hdir = directory / HISTORY / path.name
                if real_dir(hdir):
                    os.replace(hdir, directory / HISTORY / name)
        write_atomically(directory / META, json.dumps({**meta, "format": FORMAT}).encode())
        fsync_dir(directory)

    @contextlib.contextmanager
    def _claims(self, store_id: str, directory: Path, *, change: bool) -> Iterator[ClaimsJournal]:
        """Lock the store (exclusive to `change` it, else shared); bring its claims journal up to date."""
        journal = self._journals.get(store_id)
        if journal is None or journal.path.parent != directory:
            journal = self._journals[store_id] = ClaimsJournal(directory / CLAIMS)
        with locked(directory, shared=not change), journal.mutex:  # always this order
            journal.refresh(repair=change)
            yield journal

    def _compact(self, journal: ClaimsJournal, directory: Path, known: Mapping[str, int]) -> None:
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
        data = read_bytes(path)
        if data is None:
            return None
        head, sep, value = data.partition(b"\n")
        try:
            found_key, content_type, version, updated_at = parse_header(head if sep else b"")
        except ValueError as exc:
            error = self._corrupt(path, store_id, key, exc)
            error.raw = data
            raise error from exc
        return StoredRecord(found_key, value, content_type, version, updated_at)

    def _header_version(self, path: Path) -> int | None:
        """The version in a record file's header; None when absent or unreadable (it is replaced)."""
        head = read_bytes(path, 0)
        if head is None:
            return None
        try:
            return parse_header(head)[2]
        except ValueError:
            return None

    # -- stores -------------------------------------------------------------

    def _stores(self) -> list[StoreInfo]:
        found = []
        if real_dir(self.root) or self.root.is_dir():
            for directory in self.root.iterdir():
                if directory.name.startswith(".") or not real_dir(directory):
                    continue
                if not (directory / META).exists():
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
            make_private_dirs(self.root)
            with locked(self.root):
                for info in self._stores():
                    if info.name == name:
                        return info
                info = StoreInfo(uuid.uuid4().hex, name)
                directory = self.root / info.id
                os.mkdir(directory, DIR_MODE)
                meta = json.dumps({"id": info.id, "name": name, "format": FORMAT}).encode()
                write_atomically(directory / META, meta)
                fsync_dir(directory)
                fsync_dir(self.root)
                self._names[info.id] = name
                return info

        return await self._run(find)

    async def list_stores(self) -> list[StoreInfo]:
        return await self._run(self._stores)

    async def drop_store(self, store_id: str) -> None:
        def drop() -> None:
            try:
                directory = self._store_dir(store_id)
            except StoreNotFoundError:
                return  # gone already, as the contract allows
            # Renaming first makes the drop atomic for readers: the store vanishes whole.
            gone = self.root / f".dropped-{uuid.uuid4().hex}"
            os.replace(directory, gone)
            fsync_dir(self.root)
            self._names.pop(store_id, None)
            self._journals.pop(store_id, None)
            shutil.rmtree(gone, ignore_errors=True)

        await self._run(drop, store_id)

    # -- the transactional primitives (the work is FileBatch's) -------------------

    async def run_transaction(self, fn: Callable[[FileBatch], T], *, write: bool, store_ids: Set[str]) -> T:
        def call() -> T:
            with FileBatch(self, store_ids, exclusive=write) as batch:
                return fn(batch)

        return await self._run(call)

    def find_records(
        self, txn: FileBatch, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, StoredRecord | StorageError]]:
        return txn.missing, txn.find_records(pairs)

    def find_versions(
        self, txn: FileBatch, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, int]]:
        return txn.missing, txn.find_versions(pairs)

    def store_claims(self, txn: FileBatch, claimed: Mapping[Pair, int]) -> None:
        txn.store_claims(claimed)

    def apply_plan(self, txn: FileBatch, plan: WritePlan) -> dict[Pair, StorageError]:
        return txn.apply_plan(plan)

    # -- listings ----------------------------------------------------------------

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        def listing() -> list[RecordInfo]:
            directory = self._store_dir(store_id)
            where = f"file store {self.url}, store {self._label(store_id)!r}"
            with self._claims(store_id, directory, change=False) as journal:
                page = with_deltas(directory, list_page(directory, exclusive_start_key, limit, where))
                return [
                    info
                    if (v := journal.versions.get(encode_key(info.key), 0)) <= info.version
                    else info._replace(version=v)
                    for info in page
                ]

        return await self._run(listing, store_id)

    async def purge_store(self, store_id: str) -> None:
        def purge() -> None:
            directory = self._store_dir(store_id)
            with locked(directory):
                remove_dir(directory / HISTORY)
                for name in os.listdir(directory):
                    if not name.startswith(".") and name.endswith(SUFFIX):
                        (directory / name).unlink(missing_ok=True)  # a link is removed, not followed
                remove_dir(directory / DELTAS)  # after the records: a crash between leaves only stale logs
                (directory / CLAIMS).unlink(missing_ok=True)  # its records are gone
                fsync_dir(directory)

        await self._run(purge, store_id)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        def history() -> list[StoredRecord]:
            hdir = self._store_dir(store_id) / HISTORY / encode_key(key)
            if not real_dir(hdir):
                return []
            found = []
            for path in sorted(hdir.iterdir(), reverse=True):
                with contextlib.suppress(RecordCorruptError):
                    record = self._read_file(path, store_id, key)
                    if record is not None:
                        found.append(record)
            return found

        return await self._run(history, store_id)

    async def describe_durability(self) -> Durability:
        """Durable on return: every record file and its directory are fsynced before a batch returns."""
        return Durability(
            "file",
            True,
            "durable on return: each record is written to a temporary file, fsynced, renamed, "
            "and its directory fsynced",
            {"root": str(self.root)},
        )

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.shutdown)
