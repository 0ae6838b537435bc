"""The file store's deltas: one append-only log per record, beside its snapshot file.

Layout: `<store id>/.deltas/<record file name>`, made only when a record of the
store is first appended to (a store written before deltas has none, and reads
as it always did). The log is a run of frames, each

    b"RSd1" | body length (8 bytes) | CRC-32 of the body (4) | body
    body: snapshot version (8) | snapshot time, µs (8) | version (8) | time, µs (8)
          | content type length (2) | content type | value

Why a log and not one file per delta: an append is then one `pwrite` and one
`fdatasync` of the log (no new file, no directory sync, except for the first
delta after a snapshot), and a read of the chain is one file read, however
many deltas the record holds. What a crash leaves is handled by the frames:
a frame cut short by SIGKILL or power loss fails its length or CRC check, and
it and everything after it are ignored (the next append writes over them).
A frame damaged on disk later (not by a crash) ends the chain the same way:
the deltas after it are not read.
The snapshot file is never touched by an append: its version moves because the
record's version is the largest of its header's, its last claim's (the claims
journal) and its last delta's.

Every frame names the snapshot it follows (its header's version and time):
only frames that follow the snapshot file now in place count. A snapshot
written over a record makes its old log stale at once, so the order of the
two files never matters to a reader; the stale log is then removed, or, when
the same batch appends after the write, replaced by a log staged before the
snapshot was written. A record created afresh (absent, unreadable, or deleted
first) has any log left from an earlier life removed before its snapshot is
written, so that no later snapshot of it can meet a stale frame by chance.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
import zlib
from collections.abc import Callable, Sequence, Set
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from .._errors import StorageError
from ._backend import RecordAppend
from ._contract import Pair, WritePlan
from ._files_claims import fdatasync
from ._files_io import NOFOLLOW, encode_key, fsync_dir, make_dir, write_atomically, write_temporary

Runner = Callable[[Callable[[Pair], None], Sequence[Pair]], None]

_log = logging.getLogger("recoverable_state.storage")

DELTAS = ".deltas"
_MAGIC = b"RSd1"
_FRAME = struct.Struct(">4sQI")  # magic, body length, CRC-32 of the body
_BODY = struct.Struct(">QqQqH")  # snapshot version, snapshot time, version, time, content type length
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
PROBE = 32
"""Batches of at most this many records of a store look for each one's log; larger ones list the directory."""


def stamp(moment: datetime) -> int:
    """A time as whole microseconds since the epoch (what a frame keeps of its snapshot's time)."""
    return (moment - _EPOCH) // _MICRO


class DeltaLog(NamedTuple):
    """What a record's log holds for the snapshot in place."""

    pieces: list[tuple[bytes, str]]
    """The deltas that follow the snapshot, in order: (value, content type)."""
    version: int
    """The version of the last of them (0: none)."""
    updated_at: datetime | None
    """When the last of them was appended."""
    frames: bytes
    """Their frames, as stored (kept when the log is written afresh)."""
    end: int | None
    """Where the next frame goes when every frame of the log follows the snapshot; None: write it afresh."""


def has_logs(directory: Path) -> bool:
    """Whether a store ever kept deltas (one `lstat`); a link in place of `.deltas` is not followed."""
    try:
        return stat.S_ISDIR(os.lstat(directory / DELTAS).st_mode)
    except FileNotFoundError:
        return False


def logs_of(directory: Path, names: Sequence[str]) -> set[str]:
    """The names among `names` that have a log: nothing at all when the store never had deltas.

    One failed `lstat` per batch on a store without deltas; a few `lstat`s for a
    small batch, one directory listing for a large one.
    """
    ddir = directory / DELTAS
    if not has_logs(directory):
        return set()
    if len(names) <= PROBE:
        base = f"{ddir}{os.sep}"
        return {name for name in names if os.path.lexists(base + name)}
    return set(os.listdir(ddir)).intersection(names)


def frame(snapshot: tuple[int, int], version: int, moment: int, w: RecordAppend) -> bytes:
    """One delta as a frame of the log, following `snapshot` (its version and time stamp)."""
    ct = w.content_type.encode()
    body = b"".join([_BODY.pack(snapshot[0], snapshot[1], version, moment, len(ct)), ct, w.value])
    return _FRAME.pack(_MAGIC, len(body), zlib.crc32(body)) + body


def parse_log(data: bytes, snapshot: tuple[int, int]) -> DeltaLog:
    """The frames of a log that follow `snapshot`; a torn or damaged frame ends the log."""
    pieces: list[tuple[bytes, str]] = []
    kept: list[bytes] = []
    version, moment, at, stale = 0, 0, 0, False
    while at + _FRAME.size <= len(data):
        magic, length, crc = _FRAME.unpack_from(data, at)
        body = data[at + _FRAME.size : at + _FRAME.size + length]
        if magic != _MAGIC or len(body) != length or length < _BODY.size or zlib.crc32(body) != crc:
            break
        snap_version, snap_time, v, t, ct_len = _BODY.unpack_from(body)
        if (snap_version, snap_time) == snapshot:
            kept.append(data[at : at + _FRAME.size + length])
            pieces.append((body[_BODY.size + ct_len :], body[_BODY.size : _BODY.size + ct_len].decode()))
            version, moment = v, t
        else:
            stale = True
        at += _FRAME.size + length
    when = _EPOCH + moment * _MICRO if pieces else None
    return DeltaLog(pieces, version, when, b"".join(kept), None if stale else at)


def read_log(path: str, snapshot: tuple[int, int]) -> DeltaLog | None:
    """A record's log as `parse_log` reads it; None when there is none (a link is none either)."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise  # unreadable: the batch fails, rather than answer the snapshot without its deltas
        return DeltaLog([], 0, None, b"", None)  # a link planted there: ignored, and replaced by an append
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return parse_log(b"".join(chunks), snapshot)


def scan_log(path: str, snapshot: tuple[int, int]) -> DeltaLog | None:
    """What a write batch needs of a log (its last version, where it ends), reading only frame heads.

    An append then costs its delta, not every delta before it. A crash can only
    tear the tail, so the last whole frame is checked in full (dropped, and the one
    before checked, when it fails); a log holding frames of another snapshot is
    read whole (`read_log`), as it is written afresh with the frames that count.
    """
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return DeltaLog([], 0, None, b"", None)
    try:
        size = os.fstat(fd).st_size
        heads: list[tuple[int, int, int, tuple[int, int], int, int]] = []
        at = 0
        while at + _FRAME.size + _BODY.size <= size:
            head = os.pread(fd, _FRAME.size + _BODY.size, at)
            magic, length, crc = _FRAME.unpack_from(head)
            if magic != _MAGIC or length < _BODY.size or at + _FRAME.size + length > size:
                break
            snap_version, snap_time, version, moment, _ = _BODY.unpack_from(head, _FRAME.size)
            heads.append((at, length, crc, (snap_version, snap_time), version, moment))
            at += _FRAME.size + length
        while heads and zlib.crc32(os.pread(fd, heads[-1][1], heads[-1][0] + _FRAME.size)) != heads[-1][2]:
            heads.pop()
    finally:
        os.close(fd)
    if any(h[3] != snapshot for h in heads):
        return read_log(path, snapshot)
    if not heads:
        return DeltaLog([], 0, None, b"", 0)
    start, length, _, _, version, moment = heads[-1]
    return DeltaLog([], version, _EPOCH + moment * _MICRO, b"", start + _FRAME.size + length)


def append_frames(ddir: Path, name: str, log: DeltaLog | None, frames: bytes) -> bool:
    """Add frames to a record's log, durably; True when the log was made anew (its directory needs a sync).

    Appends in place where every frame of the log follows the snapshot (bytes left
    past them by a crash are cut off); otherwise writes the log afresh, keeping the
    frames that follow the snapshot. On failure nothing of the new frames stays.
    """
    path = ddir / name
    if log is None or log.end is None:
        make_dir(ddir)
        write_atomically(path, (log.frames if log else b"") + frames)
        return True
    fd = os.open(path, os.O_WRONLY | NOFOLLOW)
    try:
        try:
            view, at = memoryview(frames), log.end
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if os.fstat(fd).st_size > at:
                os.ftruncate(fd, at)
            fdatasync(fd)
        except BaseException:
            with contextlib.suppress(OSError):  # a failed append leaves no frame behind
                os.ftruncate(fd, log.end)
                os.fsync(fd)
            raise
    finally:
        os.close(fd)
    return False


def stage(ddir: Path, data: bytes) -> Path:
    """A new log in a temporary file of `.deltas`, synced: put in place once its snapshot is durable."""
    make_dir(ddir)
    return write_temporary(ddir, data)


class BatchDeltas:
    """What one batch of the file store does to its records' logs, around the snapshot writes.

    Filled by the batch's lookups (`seen`), then called by `FileBatch.apply_plan`:
    `before_rows` (logs of records created afresh removed, logs to follow new
    snapshots staged), `after_rows` (once the snapshots are durable: staged logs
    put in place, stale ones removed) and `append` (the appends to records not
    written in the batch).
    """

    def __init__(self, dirs: dict[str, Path], label: Callable[[str], str]) -> None:
        self.dirs = dirs
        self.label = label
        self.logs: dict[Pair, DeltaLog] = {}
        """The records of the batch that have a log file, with what it holds."""
        self.heads: dict[Pair, tuple[int, datetime]] = {}
        """Each record's snapshot (header version and time), for the frames appended after it."""
        self.orphans: set[Pair] = set()
        """Records with a log but no readable snapshot: the log goes before a snapshot is written."""
        self.staged: dict[Pair, Path] = {}

    def names(self, store_id: str, pairs: Sequence[Pair]) -> set[str]:
        """The file names of the batch's records of one store that have a log."""
        if not has_logs(self.dirs[store_id]):
            return set()  # the common case: no cost per record
        names = list(dict.fromkeys(encode_key(key) for sid, key in pairs if sid == store_id))
        return logs_of(self.dirs[store_id], names) if names else set()

    def seen(
        self, pair: Pair, name: str, header: tuple[int, datetime] | None, *, whole: bool
    ) -> DeltaLog | None:
        """Read the log of a record found with one (`header`: its snapshot's, None when unreadable).

        `whole` reads its deltas too (to answer a read); else only what a write needs.
        """
        path = f"{self.dirs[pair[0]]}{os.sep}{DELTAS}{os.sep}{name}"
        read = read_log if whole else scan_log
        if header is None:
            self.orphans.add(pair)
            log = read(path, (0, 0))
        else:
            self.heads[pair] = header
            log = read(path, (header[0], stamp(header[1])))
        if log is not None:
            self.logs[pair] = log
        return log

    def before_rows(
        self, plan: WritePlan, fresh: Set[Pair], failed: dict[Pair, StorageError], now: float
    ) -> None:
        """Remove the logs of records created afresh; stage the logs of records appended after their write."""
        synced: set[str] = set()
        for pair in plan.rows:
            if pair in failed or pair not in self.logs or not (pair in fresh or pair in self.orphans):
                continue
            try:
                (self.dirs[pair[0]] / DELTAS / encode_key(pair[1])).unlink(missing_ok=True)
            except OSError as exc:
                failed[pair] = self._error(pair, exc)
            else:
                synced.add(pair[0])
        for store_id in synced:
            fsync_dir(self.dirs[store_id] / DELTAS)
        when = stamp(datetime.fromtimestamp(now, UTC))  # the snapshot's header time, as it will be read
        for pair, added in plan.appends.items():
            if pair in plan.rows and pair not in failed:
                snapshot = (plan.rows[pair][1], when)
                frames = b"".join(frame(snapshot, v, when, a) for v, a in added)
                try:
                    self.staged[pair] = stage(self.dirs[pair[0]] / DELTAS, frames)
                except OSError as exc:
                    failed[pair] = self._error(pair, exc)

    def after_rows(self, plan: WritePlan, failed: dict[Pair, StorageError]) -> None:
        """Once the new snapshots are durable: put each staged log in place, remove the stale ones."""
        touched: set[str] = set()
        for pair in plan.rows:
            tmp = self.staged.pop(pair, None)
            path = self.dirs[pair[0]] / DELTAS / encode_key(pair[1])
            if pair in failed:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                continue
            if tmp is not None:
                os.replace(tmp, path)  # an OSError here is the batch's: the snapshot stands without them
            elif pair in self.logs:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:  # stale already (it follows the old snapshot): only left over
                    _log.warning("file store: stale deltas %s not removed: %s", path, exc)
                    continue
            else:
                continue
            touched.add(pair[0])
        for store_id in touched:
            fsync_dir(self.dirs[store_id] / DELTAS)

    def append(self, pair: Pair, added: list[tuple[int, RecordAppend]], now: float) -> bool:
        """Append a record's new deltas to its log; True when the log was made anew."""
        when = stamp(datetime.fromtimestamp(now, UTC))
        version, updated_at = self.heads[pair]
        snapshot = (version, stamp(updated_at))
        frames = b"".join(frame(snapshot, v, when, a) for v, a in added)
        directory = self.dirs[pair[0]]
        new_dir = not os.path.lexists(directory / DELTAS)
        made = append_frames(directory / DELTAS, encode_key(pair[1]), self.logs.get(pair), frames)
        if new_dir:
            fsync_dir(directory)
        return made

    def appends(self, plan: WritePlan, failed: dict[Pair, StorageError], run: Runner, now: float) -> None:
        """The appends to records not written in the batch, on parallel threads (a failure fails its own)."""
        made: set[str] = set()

        def one(pair: Pair) -> None:
            try:
                if self.append(pair, plan.appends[pair], now):
                    made.add(pair[0])
            except OSError as exc:
                failed[pair] = self._error(pair, exc)

        run(one, [pair for pair in plan.appends if pair not in plan.rows and pair not in failed])
        for store_id in made:
            fsync_dir(self.dirs[store_id] / DELTAS)

    def _error(self, pair: Pair, exc: OSError) -> StorageError:
        path = self.dirs[pair[0]] / DELTAS / encode_key(pair[1])
        return StorageError(
            f"the record's deltas could not be stored in {str(path)!r}: {exc}",
            store=self.label(pair[0]),
            key=pair[1],
        )
