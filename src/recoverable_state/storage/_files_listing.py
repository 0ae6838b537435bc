"""The file store's listings: a page of a store directory in key order, headers read only for the page."""

from __future__ import annotations

import heapq
import logging
import os
from pathlib import Path
from urllib.parse import unquote

from ._backend import RecordInfo
from ._files_deltas import DELTAS, logs_of, read_log, stamp
from ._files_io import NOFOLLOW, SUFFIX, encode_key, parse_header

_log = logging.getLogger("recoverable_state.storage")


def record_info(path: Path, where: str) -> RecordInfo | None:
    """What a record file's header tells; None when it is gone, a link, or unreadable (warned of)."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError:
        return None  # gone meanwhile, or a link: not a record
    with os.fdopen(fd, "rb") as fh:
        head = fh.readline()
        size = os.fstat(fh.fileno()).st_size - len(head)
    try:
        key, content_type, version, updated_at = parse_header(head)
    except ValueError as exc:
        _log.warning("%s: record file %r has no readable header (%s)", where, str(path), exc)
        return None
    if encode_key(key) != path.name:
        _log.warning("%s: skipping %s, whose header names another key (%r)", where, path, key)
        return None
    return RecordInfo(key, size, content_type, version, updated_at)


def list_page(directory: Path, start: str | None, limit: int | None, where: str) -> list[RecordInfo]:
    """The records after `start`, at most `limit`, in key order (code points).

    Keys come from the file names (one directory scan); a hashed name (a long key)
    is the one kind whose key needs its header read first.
    """
    named: dict[str, str] = {}  # key -> file name
    headed: dict[str, RecordInfo] = {}  # what was read already, by key
    for name in os.listdir(directory):
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        if name.startswith("~"):
            info = record_info(directory / name, where)
            if info is None:
                continue
            key = info.key
            headed[key] = info
        else:
            key = name[: -len(SUFFIX)]
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
        info = headed.get(key) or record_info(directory / named[key], where)
        if info is not None:
            infos.append(info)
    return infos


def with_deltas(directory: Path, infos: list[RecordInfo]) -> list[RecordInfo]:
    """A page with each record's deltas counted: its version and time are its last delta's, its
    size the snapshot's value plus the deltas' values (what a read of it carries, framing aside)."""
    names = [encode_key(info.key) for info in infos]
    if not (logs := logs_of(directory, names)):
        return infos
    base = f"{directory}{os.sep}{DELTAS}{os.sep}"
    page = []
    for info, name in zip(infos, names, strict=True):
        log = read_log(base + name, (info.version, stamp(info.updated_at))) if name in logs else None
        if log is not None and log.pieces and log.updated_at is not None:
            size = info.size + sum(len(value) for value, _ in log.pieces)
            info = info._replace(size=size, version=max(info.version, log.version), updated_at=log.updated_at)
        page.append(info)
    return page
