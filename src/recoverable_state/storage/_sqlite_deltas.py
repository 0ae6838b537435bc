"""The SQLite backend's deltas: the changes appended to a record since its snapshot, in a table of their own.

An append inserts one row in `deltas` and moves the record's version in `versions`,
as a claim does: the record's own row, which may hold a snapshot of many megabytes,
is not written (an UPDATE of any of its columns would rewrite the whole row, its
overflow pages included). A record with deltas thus always has its version in
`versions`, past its own.

A snapshot written over a record drops its deltas. Rather than a DELETE per record
of every batch, a batch first asks whether its stores have any delta at all, one
probe of the primary key per store: a store that never had a delta pays only that.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Set
from datetime import UTC, datetime

from ._backend import RecordAppend, StoredRecord
from ._chain import CHAIN_CONTENT_TYPE, pack_chain
from ._contract import Pair, by_store

_CHUNK = 500  # keys per IN (...) query, well under SQLite's limit of placeholders

_ANY = "SELECT 1 FROM deltas WHERE store_id = ? LIMIT 1"

_INSERT = (
    "INSERT INTO deltas (store_id, key, version, value, content_type, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
)

_MOVE_VERSION = (
    "INSERT INTO versions (store_id, key, version) VALUES (?, ?, ?) "
    "ON CONFLICT (store_id, key) DO UPDATE SET version = excluded.version"
)

_OF_RECORD = "FROM deltas AS d WHERE d.store_id = records.store_id AND d.key = records.key"

_LISTING_WITH_DELTAS = (
    f"length(value) + coalesce((SELECT sum(length(d.value)) {_OF_RECORD}), 0), content_type, "
    f"max(updated_at, coalesce((SELECT max(d.updated_at) {_OF_RECORD}), 0))"
)
"""Size and content type and time columns of a listing, in a store with deltas (over `records`):
the size counts the snapshot and its deltas, the time is the last append's when later."""


def stores_with_deltas(conn: sqlite3.Connection, store_ids: Iterable[str]) -> set[str]:
    """Those of `store_ids` that hold at least one delta."""
    return {sid for sid in store_ids if conn.execute(_ANY, (sid,)).fetchone() is not None}


def listing_columns(conn: sqlite3.Connection, store_id: str) -> str:
    """The size, content type and time columns of a listing of this store (over `records`)."""
    if stores_with_deltas(conn, (store_id,)):
        return _LISTING_WITH_DELTAS
    return "length(value), content_type, updated_at"


def drop_deltas(conn: sqlite3.Connection, store_ids: Set[str], pairs: Iterable[Pair], use_json: bool) -> None:
    """Delete the deltas of these records of `store_ids` (a snapshot is written over them).

    Only the stores that have any are looked in; `pairs` is not even gone through
    when none has (a batch of 10,000 writes to a store without deltas costs one probe).
    """
    if not (stores := stores_with_deltas(conn, store_ids)):
        return
    for store_id, keys in by_store(pair for pair in pairs if pair[0] in stores).items():
        if use_json:  # one statement per store: its keys as one JSON array
            conn.execute(
                "DELETE FROM deltas WHERE store_id = ? AND key IN (SELECT value FROM json_each(?))",
                (store_id, json.dumps(keys, ensure_ascii=False)),
            )
        else:
            conn.executemany(
                "DELETE FROM deltas WHERE store_id = ? AND key = ?", [(store_id, key) for key in keys]
            )


def append_deltas(
    conn: sqlite3.Connection, appends: Mapping[Pair, list[tuple[int, RecordAppend]]], now: float
) -> int:
    """Keep each record's new deltas and move its version to the last one's; the bytes of the deltas."""
    conn.executemany(
        _INSERT,
        [
            (sid, key, version, a.value, a.content_type, now)
            for (sid, key), added in appends.items()
            for version, a in added
        ],
    )
    conn.executemany(_MOVE_VERSION, [(sid, key, added[-1][0]) for (sid, key), added in appends.items()])
    return sum(len(a.value) for added in appends.values() for _, a in added)


def add_chains(conn: sqlite3.Connection, found: dict[Pair, StoredRecord], store_ids: Iterable[str]) -> None:
    """Replace each record of `found` (of `store_ids`) that has deltas by the chain of its pieces."""
    if not found or not (stores := stores_with_deltas(conn, store_ids)):
        return
    pieces: dict[Pair, list[tuple[int, bytes, str, float]]] = {}
    for store_id, keys in by_store(pair for pair in found if pair[0] in stores).items():
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            rows = conn.execute(
                "SELECT key, version, value, content_type, updated_at FROM deltas "
                f"WHERE store_id = ? AND key IN ({','.join('?' * len(chunk))})",
                (store_id, *chunk),
            )
            for key, version, value, content_type, at in rows:
                pieces.setdefault((store_id, key), []).append((version, value, content_type, at))
    for pair, deltas in pieces.items():
        deltas.sort()  # by version: the order they were appended in
        record = found[pair]
        chain = pack_chain([(record.value, record.content_type), *((v, ct) for _, v, ct, _ in deltas)])
        updated_at = max(record.updated_at, datetime.fromtimestamp(deltas[-1][3], UTC))
        found[pair] = StoredRecord(record.key, chain, CHAIN_CONTENT_TYPE, record.version, updated_at)
