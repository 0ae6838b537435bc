"""One batch of the file store, as a transaction: its stores locked, the planner's answer applied.

The stores of a batch are locked in one order (sorted ids) in every process, so
that two batches never wait for each other in a circle: shared to read,
exclusive to claim or write. The handle mirrors each store's claims journal and
remembers what the lookups saw, for the apply step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import Protocol, TypeVar

from .._errors import RecordCorruptError, StorageError, StoreNotFoundError
from ._backend import StoredRecord
from ._chain import CHAIN_CONTENT_TYPE, pack_chain
from ._contract import Pair, WritePlan
from ._files_claims import ClaimsJournal
from ._files_deltas import DELTAS, BatchDeltas
from ._files_io import (
    HISTORY,
    SUFFIX,
    encode_key,
    fsync_dir,
    make_dir,
    pack,
    parse_header,
    read_bytes,
    remove_dir,
    write_atomically,
)

T = TypeVar("T")


class FileStore(Protocol):
    """What a batch asks of the file store it runs in (`FileSystemBackend`, which makes the batch)."""

    url: str

    def _label(self, store_id: str) -> str: ...
    def _store_dir(self, store_id: str) -> Path: ...
    def _claims(
        self, store_id: str, directory: Path, *, change: bool
    ) -> contextlib.AbstractContextManager[ClaimsJournal]: ...
    def _compact(self, journal: ClaimsJournal, directory: Path, known: Mapping[str, int]) -> None: ...
    def _map(self, fn: Callable[[T], object], items: Sequence[T]) -> None: ...
    def _read_file(self, path: str | Path, store_id: str, key: str | None = None) -> StoredRecord | None: ...


_log = logging.getLogger("recoverable_state.storage")


class FileBatch:
    """The transaction handle of the file store: a batch's stores, locked, with their journals."""

    def __init__(self, files: FileStore, store_ids: Set[str], *, exclusive: bool) -> None:
        self.files = files
        self.missing: dict[str, StorageError] = {}
        self.dirs: dict[str, Path] = {}
        self.journals: dict[str, ClaimsJournal] = {}
        self.headers: dict[str, dict[str, int]] = {}
        """Per store: record file name -> header version, of the records read (spares compaction a read)."""
        self.fresh: set[Pair] = set()
        """Records absent or unreadable, whose old claims must end before they are written."""
        self.deltas = BatchDeltas(self.dirs, files._label)
        self._locks = contextlib.ExitStack()
        self._store_ids = sorted(store_ids)
        self._exclusive = exclusive

    def __enter__(self) -> FileBatch:
        with contextlib.ExitStack() as locks:
            for store_id in self._store_ids:
                try:
                    directory = self.files._store_dir(store_id)
                except StoreNotFoundError as exc:
                    self.missing[store_id] = exc
                    continue
                self.dirs[store_id] = directory
                claims = self.files._claims(store_id, directory, change=self._exclusive)
                self.journals[store_id] = locks.enter_context(claims)
                self.headers[store_id] = {}
            self._locks = locks.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._locks.close()

    def find_records(self, pairs: Sequence[Pair]) -> dict[Pair, StoredRecord | StorageError]:
        found: dict[Pair, StoredRecord | StorageError] = {}
        # String paths: a Path per file costs as much as reading it.
        bases = {store_id: f"{directory}{os.sep}" for store_id, directory in self.dirs.items()}
        logs = {store_id: self.deltas.names(store_id, pairs) for store_id in self.dirs}
        for pair in pairs:
            store_id, key = pair
            if pair in found or store_id not in bases:
                continue
            name = encode_key(key)
            try:
                record = self.files._read_file(bases[store_id] + name, store_id, key)
            except RecordCorruptError as exc:
                found[pair] = exc
                continue
            if record is not None:
                self.headers[store_id][name] = record.version
                if logs[store_id] and name in logs[store_id]:
                    record = self._chain(pair, name, record)
                if (version := self.journals[store_id].versions.get(name, 0)) > record.version:
                    record = record._replace(version=version)
                found[pair] = record
        return found

    def _chain(self, pair: Pair, name: str, record: StoredRecord) -> StoredRecord:
        """A record with its deltas: the chain of its snapshot and the deltas that follow it."""
        log = self.deltas.seen(pair, name, (record.version, record.updated_at), whole=True)
        if log is None or not log.pieces:
            return record
        key, value, content_type, version, updated_at = record
        chain = pack_chain([(value, content_type), *log.pieces])
        when = log.updated_at or updated_at
        return StoredRecord(key, chain, CHAIN_CONTENT_TYPE, max(version, log.version), when)

    def find_versions(self, pairs: Sequence[Pair]) -> dict[Pair, int]:
        stored: dict[Pair, int] = {}
        seen: set[Pair] = set()
        logs = {store_id: self.deltas.names(store_id, pairs) for store_id in self.dirs}
        heads = self.deltas.heads
        for pair in pairs:
            store_id, key = pair
            if pair in seen or store_id not in self.dirs:
                continue
            seen.add(pair)
            name = encode_key(key)
            head = read_bytes(self.dirs[store_id] / name, 0)
            claimed = self.journals[store_id].versions.get(name, 0)
            header: int | None = None
            if head is not None:
                with contextlib.suppress(ValueError):
                    _, _, header, updated_at = parse_header(head)
                    heads[pair] = (header, updated_at)
            if logs[store_id] and name in logs[store_id]:  # also of an absent record: a crash left it
                log = self.deltas.seen(pair, name, None if header is None else heads[pair], whole=False)
                claimed = max(claimed, log.version if log else 0)
            if head is not None:
                stored[pair] = 0 if header is None else max(header, claimed)  # 0: unreadable
            if header is None and claimed:
                self.fresh.add(pair)
        return stored

    def store_claims(self, claimed: Mapping[Pair, int]) -> None:
        """One append and one sync per store: no record file is rewritten."""
        lines: dict[str, list[tuple[str, int]]] = {}
        for (store_id, key), version in claimed.items():
            lines.setdefault(store_id, []).append((encode_key(key), version))
        for store_id, entries in lines.items():
            journal = self.journals[store_id]
            journal.append(entries)
            self.files._compact(journal, self.dirs[store_id], self.headers[store_id])

    def apply_plan(self, plan: WritePlan) -> dict[Pair, StorageError]:
        """Deletes first, then the records (on parallel threads), then one sync per directory.

        A record that cannot be written is answered with its error, nothing of it
        changed; one deleted and then not written again raises for the whole batch.
        """
        failed: dict[Pair, StorageError] = {}
        for pair in plan.deletes:
            self._delete(pair, failed)
        undeleted = set(failed)
        reset: dict[str, list[tuple[str, int]]] = {}
        for pair in plan.rows:
            name = encode_key(pair[1])
            if pair in undeleted or not self.journals[pair[0]].versions.get(name):
                continue
            if pair in self.fresh or pair in plan.deletes:
                reset.setdefault(pair[0], []).append((name, 0))
        for store_id, entries in reset.items():
            self.journals[store_id].append(entries)
        now = time.time()
        if self.deltas.logs or plan.appends:
            self.deltas.before_rows(plan, plan.deletes, failed, now)
        rows = [pair for pair in plan.rows if pair not in failed]
        self.files._map(lambda pair: self._put(plan, pair, now, failed), rows)
        for store_id in {pair[0] for pair in (*plan.rows, *plan.deletes)}:
            fsync_dir(self.dirs[store_id])
        if self.deltas.logs or plan.appends:
            self.deltas.after_rows(plan, failed)
            self.deltas.appends(plan, failed, self.files._map, now)
        for pair, (w, version) in plan.rows.items():
            if pair not in failed:
                self.journals[pair[0]].written(encode_key(w.key), version)
        for store_id, journal in self.journals.items():
            self.files._compact(journal, self.dirs[store_id], {})
        if lost := [pair for pair in plan.deletes if pair in failed and pair not in undeleted]:
            raise StorageError(
                f"a record deleted and written again in one batch could not be written ({failed[lost[0]]}): "
                "the batch may or may not have landed",
                store=self.files._label(lost[0][0]),
                key=lost[0][1],
            )
        return failed

    def _delete(self, pair: Pair, failed: dict[Pair, StorageError]) -> None:
        """Remove a record file, then its history (left over, with a warning, if that fails)."""
        store_id, key = pair
        name = encode_key(key)
        directory = self.dirs[store_id]
        try:
            (directory / name).unlink(missing_ok=True)  # a link planted there is removed, not followed
        except OSError as exc:
            failed[pair] = self._error(pair, "deleted from", exc)
            return
        try:  # after the record: its deltas, were they left by a crash, follow no snapshot of it
            if pair in self.deltas.logs:
                (directory / DELTAS / name).unlink(missing_ok=True)
            remove_dir(directory / HISTORY / name)
        except OSError as exc:
            _log.warning("file store %s: history or deltas of %r not removed: %s", self.files.url, key, exc)

    def _put(self, plan: WritePlan, pair: Pair, now: float, failed: dict[Pair, StorageError]) -> None:
        """Write a record's history snapshots, then the record; on failure, neither stays."""
        w, version = plan.rows[pair]
        directory = self.dirs[pair[0]]
        name = encode_key(w.key)
        data = pack(w.key, w.value, w.content_type, version, now)
        change = plan.history.get(pair)
        written: list[Path] = []
        try:
            if change is not None:
                hdir = directory / HISTORY / name
                make_dir(directory / HISTORY)
                make_dir(hdir)
                for v, hw in change.added:
                    written.append(hdir / f"{v:020d}{SUFFIX}")
                    snapshot = data if v == version else pack(w.key, hw.value, hw.content_type, v, now)
                    write_atomically(written[-1], snapshot)
            write_atomically(directory / name, data)
        except OSError as exc:
            for path in written:  # the record was not replaced: neither are its snapshots
                with contextlib.suppress(OSError):
                    path.unlink()
            failed[pair] = self._error(pair, "written to", exc)
            return
        if change is not None:
            try:
                _trim(directory / HISTORY / name, change.keep_total)
            except OSError as exc:  # the record stands; old snapshots are left over
                _log.warning("file store %s: history of %r not trimmed: %s", self.files.url, w.key, exc)

    def _error(self, pair: Pair, done: str, exc: OSError) -> StorageError:
        path = self.dirs[pair[0]] / encode_key(pair[1])
        return StorageError(
            f"the record could not be {done} {str(path)!r}: {exc}",
            store=self.files._label(pair[0]),
            key=pair[1],
        )


def _trim(hdir: Path, keep: int) -> None:
    """Delete all but the newest `keep` snapshots in a history directory, then sync it."""
    versions = sorted((p.name for p in hdir.iterdir() if p.name.endswith(SUFFIX)), reverse=True)
    for name in versions[keep:]:
        (hdir / name).unlink(missing_ok=True)
    fsync_dir(hdir)
