"""Big values written into SQLite through an incremental blob handle instead of being bound.

Binding a value to a statement copies it into SQLite, which then builds the row in a
second copy before cutting it into pages: a record of 47 MB held twice its size beyond
itself while it was written, on top of the bytes the batch holds. Where the value is
the last column of its table (every table of a database made by this release), a value
from `BLOB_FROM` on is bound as an empty placeholder, then its row's value is made
`zeroblob(n)` (SQLite keeps a trailing zeroblob as a count, not as bytes) and its bytes
are written into the row's pages in steps of 1 MiB, read straight from the bytes object
the batch holds. Both happen in the batch's transaction: a failure rolls the
placeholder back with the rest, and no reader ever sees it. A table with the value in
the middle (a database of an earlier release) has its values bound, as before: there
the zeroblob would be made whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

BLOB_FROM = 1 << 20
"""The size of a value from which it is written through a blob handle (smaller ones are bound)."""

_STEP = 1 << 20
_TABLES = ("records", "history", "deltas")

Row = tuple[Any, ...]


def tables_with_value_last(conn: sqlite3.Connection) -> frozenset[str]:
    """The tables of `conn`'s database whose last column is `value`."""
    return frozenset(
        table
        for table in _TABLES
        if [row[1] for row in conn.execute(f"PRAGMA table_info({table})")][-1:] == ["value"]
    )


BY_VERSION = "store_id = ? AND key = ? AND version = ?"
"""How `write_big` finds a row of history or deltas (a record's is found by store and key)."""


def hold_back_big(rows: list[Row], value_at: int, blobs: bool) -> tuple[list[Row], list[Row]]:
    """`rows` (a statement's parameters) with each big value, at `value_at`, bound as b"";
    and the rows that had one. `blobs`: whether the table takes them (if not, none is held back).

    One pass of len() over the rows: about 4 ms for 100,000, in the store's thread.
    """
    if not blobs:
        return rows, []
    big = [row for row in rows if len(row[value_at]) >= BLOB_FROM]
    if not big:
        return rows, big
    kept = [
        row if len(row[value_at]) < BLOB_FROM else (*row[:value_at], b"", *row[value_at + 1 :])
        for row in rows
    ]
    return kept, big


def write_big(
    txn: sqlite3.Connection,
    table: str,
    rows: Iterable[Row],
    value_at: int,
    key_at: tuple[int, ...],
    where: str = "store_id = ? AND key = ?",
) -> None:
    """Write the value of each row (held back) into the row of `table` that `where` finds by `key_at`."""
    for row in rows:
        value, key = row[value_at], tuple(row[i] for i in key_at)
        found = txn.execute(
            f"UPDATE {table} SET value = zeroblob(?) WHERE {where} RETURNING rowid", (len(value), *key)
        ).fetchall()
        if len(found) != 1:  # the statement before this one put the row there, in this transaction
            raise sqlite3.IntegrityError(f"{table}: expected one row for {key!r}, found {len(found)}")
        with txn.blobopen(table, "value", found[0][0]) as blob:
            view = memoryview(value)
            for start in range(0, len(value), _STEP):
                blob.write(view[start : start + _STEP])
