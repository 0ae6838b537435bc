"""The PostgreSQL backend's deltas: a record's appended changes, kept in their own table.

`deltas(store_id, key_hash, version, value, content_type, primary key (store_id,
key_hash, version))` holds each delta beside its record; the record's row keeps
the snapshot. An append inserts the delta and moves the record's version
(`UPDATE records SET version`): PostgreSQL writes a new heap tuple for it, but a
big value stored out of line (TOAST, the default EXTENDED storage of a bytea
past about 2 KB) is not rewritten, the new tuple copies its pointer; so an
append costs the delta, not the snapshot.

The common path pays one tiny statement per batch, sent with the others in the
same round trip: `STORES_WITH_DELTAS`, which stores of the batch hold any delta
at all (one index probe per store). Only for those are deltas read (reads) or
dropped (writes over a record, deletes).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from ._backend import StoredRecord
from ._chain import CHAIN_CONTENT_TYPE, pack_chain
from ._contract import Pair, WritePlan, split_by_size
from ._postgres_pool import Connection
from ._postgres_sql import SCHEMA

STORES_WITH_DELTAS = f"""
SELECT s FROM unnest(%b::text[]) AS s
WHERE EXISTS (SELECT 1 FROM {SCHEMA}.deltas d WHERE d.store_id = s)
"""

READ_DELTAS = f"""
SELECT d.store_id, d.key_hash, d.value, d.content_type FROM {SCHEMA}.deltas d
WHERE (d.store_id, d.key_hash) IN (SELECT * FROM unnest(%b::text[], %b::bytea[]))
ORDER BY d.store_id, d.key_hash, d.version
"""

DROP_DELTAS = f"""
DELETE FROM {SCHEMA}.deltas d USING unnest(%b::text[], %b::bytea[]) AS x(store_id, key_hash)
WHERE d.store_id = x.store_id AND d.key_hash = x.key_hash
"""

# Only the version and time move: the snapshot's TOAST pointer is copied, not its bytes.
BUMP_VERSIONS = f"""
UPDATE {SCHEMA}.records r SET version = u.version, updated_at = %b
FROM unnest(%b::text[], %b::bytea[], %b::bigint[]) AS u(store_id, key_hash, version)
WHERE r.store_id = u.store_id AND r.key_hash = u.key_hash
"""

INSERT_DELTAS = f"""
INSERT INTO {SCHEMA}.deltas (store_id, key_hash, version, value, content_type)
SELECT * FROM unnest(%b::text[], %b::bytea[], %b::bigint[], %b::bytea[], %b::text[])
"""


def stores_with_deltas(conn: Connection, store_ids: Collection[str]) -> Any:
    """The pending check of which stores hold deltas (fetch it after the rows it must follow)."""
    return conn.execute(STORES_WITH_DELTAS, (list(store_ids),))


def attach_deltas(
    conn: Connection, found: dict[Pair, StoredRecord], hash_of: Callable[[Pair], bytes], stores: set[str]
) -> None:
    """Answer each found record of `stores` that has deltas as the chain of its pieces."""
    pairs = [p for p in found if p[0] in stores]
    if not pairs:
        return
    places = {(p[0], hash_of(p)): p for p in pairs}
    cur = conn.cursor(binary=True)
    cur.execute(READ_DELTAS, ([p[0] for p in pairs], [hash_of(p) for p in pairs]))
    pieces: dict[Pair, list[tuple[bytes, str]]] = {}
    for store_id, hashed, value, ctype in cur:
        pieces.setdefault(places[(store_id, bytes(hashed))], []).append((bytes(value), ctype))
    for pair, deltas in pieces.items():
        record = found[pair]
        chain = pack_chain([(record.value, record.content_type), *deltas])
        found[pair] = record._replace(value=chain, content_type=CHAIN_CONTENT_TYPE)


def drop_deltas(conn: Connection, pairs: Sequence[Pair], hash_of: Callable[[Pair], bytes]) -> None:
    """Drop every delta of these records (a snapshot written over them, or a delete)."""
    if pairs:
        conn.execute(DROP_DELTAS, ([p[0] for p in pairs], [hash_of(p) for p in pairs]))


def store_appends(conn: Connection, plan: WritePlan, hash_of: Callable[[Pair], bytes], now: datetime) -> None:
    """Keep the plan's deltas and move their records' versions (those in `plan.rows` got theirs)."""
    appends: Mapping[Pair, list[Any]] = plan.appends
    bump = [p for p in appends if p not in plan.rows]
    if bump:
        conn.execute(
            BUMP_VERSIONS,
            (now, [p[0] for p in bump], [hash_of(p) for p in bump], [appends[p][-1][0] for p in bump]),
        )
    items = [(p, v, a) for p, added in appends.items() for v, a in added]
    for run in split_by_size(items, lambda item: len(item[2].value)):
        conn.execute(
            INSERT_DELTAS,
            (
                [p[0] for p, _, _ in run],
                [hash_of(p) for p, _, _ in run],
                [v for _, v, _ in run],
                [a.value for _, _, a in run],
                [a.content_type for _, _, a in run],
            ),
        )
