"""The file store's claims journal: fencing without rewriting record files.

A claiming batch appends one line per claimed record, `<new version> <file
name>`, to the store's journal `.claims` and syncs it once. While a record file
exists, its version is the larger of the version in its header and its last
journal line; a write stores `that + 1` in the header as ever. A record created
afresh (absent or unreadable before, or deleted in the same batch) first
appends `0 <file name>`, so that claims of a deleted record never reach its
successor. The journal starts with a line naming its generation; it is written
whole (temporary file and rename) when created and when compacted, which
happens once it holds over twice as many lines as records it still raises (plus
a slack), keeping only those lines. A line cut short by a crash is ignored, and
cut off by the next process that changes the store. Each backend object keeps
the journal in memory and reads, under the store's lock, only what other
processes appended since; a new generation is read whole. A journal line
damaged on disk is skipped with a warning (its record falls back to its
header's version); a link or FIFO planted at the journal is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ._files_io import NOFOLLOW, fsync_dir, write_atomically

CLAIMS = ".claims"
CLAIMS_MAGIC = b"recoverable-state claims 1 "
CLAIMS_SLACK = 1024  # journal lines allowed beyond twice the live ones before it is compacted

_log = logging.getLogger("recoverable_state.storage")

fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


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


class ClaimsJournal:
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
            fd = os.open(self.path, (os.O_RDWR if repair else os.O_RDONLY) | os.O_NONBLOCK | NOFOLLOW)
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
            if end < 0 or not head.startswith(CLAIMS_MAGIC):
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
        fd = os.open(self.path, os.O_WRONLY | NOFOLLOW)
        try:
            try:
                view = memoryview(data)
                at = self.offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
                fdatasync(fd)
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
        generation = CLAIMS_MAGIC + uuid.uuid4().hex.encode("ascii") + b"\n"
        body = _claim_lines(list(versions.items()))
        write_atomically(self.path, generation + body)
        fsync_dir(self.path.parent)
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
        if self.lines <= 2 * (len(self.versions) - len(self.superseded)) + CLAIMS_SLACK:
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
