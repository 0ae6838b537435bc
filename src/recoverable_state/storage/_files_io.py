"""The file store's disk: key encoding, atomic file replacement, record files, no link followed.

Keys become file names one to one, also on a file system that ignores case
(macOS, Windows): lower-case ASCII letters, digits, `-`, `_` and `.` stay as
they are, every other character is percent-encoded with upper-case hex (so
`Job` is `%4Aob`), and a leading `.` is encoded too. A name longer than 200
bytes is replaced by `~` and the SHA-256 of the key; no encoded key holds a
`~`, so the two kinds never meet. The real key is in each file's header.

A record file is a JSON header line (key, content type, version, time), then
the value. Files are opened with O_NOFOLLOW and directories checked with
lstat: a link planted in a store is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pydantic_core

FORMAT = 2  # 1: keys kept their case and "~" in file names
MAX_NAME = 200  # bytes of an encoded name before it is hashed (file names allow 255)
META = ".store.json"
LOCK = ".lock"
HISTORY = ".history"
SUFFIX = ".rec"
FILE_MODE = 0o600
DIR_MODE = 0o700
NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

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
    if len(name) > MAX_NAME:
        name = "~" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return name + SUFFIX


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def real_dir(path: Path) -> bool:
    """Whether `path` is a directory and not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def make_dir(path: Path) -> None:
    """Make `path` (one level) unless it is a real directory already; refuse a link."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not real_dir(path):
            raise OSError(errno.ELOOP, "not a directory (a link or a file) in the store", str(path)) from None


def make_private_dirs(path: Path) -> None:
    """Make `path` and its missing parents, each one this makes 0700 (those that exist stay as they are).

    `Path.mkdir(parents=True)` makes the parents 0777 less the umask: readable by everyone.
    """
    missing: list[Path] = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            os.mkdir(directory, DIR_MODE)


def create_private_file(path: Path) -> None:
    """Create `path` empty and 0600 unless it exists (a file SQLite then opens keeps that mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, FILE_MODE))


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`.

    The new file keeps the mode of the regular file it replaces (0600 when new).
    """
    try:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else FILE_MODE
    except FileNotFoundError:
        mode = FILE_MODE
    os.replace(write_temporary(path.parent, data, mode), path)


def write_temporary(directory: Path, data: bytes, mode: int = FILE_MODE) -> Path:
    """A new temporary file in `directory` holding `data`, fsynced (removed again if that fails)."""
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, FILE_MODE)
    try:
        if mode != FILE_MODE:
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
    return tmp


def read_bytes(path: str | Path, limit: int = -1) -> bytes | None:
    """A file's bytes (its first line only, with `limit=0`); None when absent. Links are refused.

    Plain `os.read` calls: a buffered file object costs more than the read itself.
    """
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
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


def parse_header(head: bytes) -> tuple[str, str, int, datetime]:
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


def pack(key: str, value: bytes, content_type: str, version: int, updated_at: float) -> bytes:
    header = {"key": key, "content_type": content_type, "version": version, "updated_at": updated_at}
    return json.dumps(header, ensure_ascii=True).encode("ascii") + b"\n" + value


def remove_dir(path: Path) -> None:
    """Remove a directory of a store with all in it; a link planted there is removed, never its target.

    Renamed aside first, so that it vanishes whole and nothing written later lands in it.
    """
    if real_dir(path):
        gone = path.with_name(f".gone-{uuid.uuid4().hex}")
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def locked(directory: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a directory's lock (`.lock`, flock): exclusive to change the store, shared to read it.

    A reader that may not create the lock file (a read-only store) reads without it.
    """
    path = directory / LOCK
    fd: int | None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, FILE_MODE)
    except OSError as exc:
        if not shared or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        except FileNotFoundError:
            fd = None  # nobody can have written this store since it became read-only
    if fd is not None:
        held_locks.add(fd)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            held_locks.discard(fd)
            os.close(fd)  # closing releases the lock


held_locks: set[int] = set()
"""The descriptors `locked` holds open now, in every thread.

A forked child closes its copies (`close_inherited_locks`): a flock belongs to the open
file, which the child's copy would keep locked after the parent closed its own, for as
long as the child lives (the child's own next `locked` then waits on it for ever).
"""


def close_inherited_locks() -> None:
    """In a forked child: close the lock descriptors the parent's threads held at the fork."""
    fds = list(held_locks)
    held_locks.clear()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
