"""The commands that look: stores, status, list, show, history and quarantine."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from ..storage import DEFAULT_STORE_NAME, Durability, RecordInfo, StorageBackend, StoredRecord
from ._output import print_json, print_record, print_table, timestamp, warn
from ._params import Json, Key, Raw, Store
from ._quarantine import SetAside, pick, set_aside
from ._runtime import find_store, options_of, require_record, run, sealed_with


def stores(ctx: typer.Context, json_: Json = False) -> None:
    """List every store: name, id and how many records it holds."""

    async def body(storage: StorageBackend) -> list[tuple[str | None, str, int]]:
        return [(s.name, s.id, len(await storage.list_records(s.id))) for s in await storage.list_stores()]

    found = run(ctx, body)
    if json_:
        print_json([{"name": name, "id": id_, "records": count} for name, id_, count in found])
        return
    if not found:
        warn(f"there are no stores in {options_of(ctx).shown_url}")
        return
    print_table(None, ["store", "id", "records"], [(name or "", id_, n) for name, id_, n in found])


def status(
    ctx: typer.Context,
    json_: Json = False,
    stale_after: Annotated[
        float | None,
        typer.Option(
            "--stale-after",
            metavar="SECONDS",
            min=0.0,
            show_default=False,
            help="Exit with 3 when a store holding records was last written longer ago than this.",
        ),
    ] = None,
) -> None:
    """Show, per store, the newest write, which key it was and how many records: spot a stuck worker.

    A line under the table says what an acknowledged write means for this storage, as
    the server or medium reports it (`durability` in each row of --json).
    """

    async def body(
        storage: StorageBackend,
    ) -> tuple[list[tuple[str | None, str, list[RecordInfo]]], Durability]:
        found = [(s.name, s.id, await storage.list_records(s.id)) for s in await storage.list_stores()]
        return found, await storage.describe_durability()

    found, durability = run(ctx, body)
    now = datetime.now(UTC)
    rows = [
        _status_row(name, id_, infos, now) | {"durability": durability.as_dict()}
        for name, id_, infos in found
    ]
    stale = [
        r
        for r in rows
        if stale_after is not None and r["age_seconds"] is not None and r["age_seconds"] > stale_after
    ]
    if json_:
        print_json(rows)
    elif not rows:
        warn(f"there are no stores in {options_of(ctx).shown_url}")
    else:
        print_table(
            None,
            ["store", "records", "newest write", "age", "newest key"],
            [
                (
                    r["name"] or r["id"],
                    r["records"],
                    r["newest_write"] or "-",
                    _age(r["age_seconds"]),
                    r["newest_key"] or "-",
                )
                for r in rows
            ],
        )
    if not json_:
        typer.echo(_durability_line(durability))
    if stale:
        names = ", ".join(repr(r["name"] or r["id"]) for r in stale)
        warn(f"not written for more than {stale_after:g} s: {names}")
        raise typer.Exit(STALE_EXIT)


STALE_EXIT = 3
"""Exit code of `status --stale-after` when a store was not written recently enough."""


def _status_row(name: str | None, id_: str, infos: list[RecordInfo], now: datetime) -> dict[str, Any]:
    """A store's row of `status`: its newest write, which key it was, how many records."""
    newest = max(infos, key=lambda i: i.updated_at, default=None)
    return {
        "name": name,
        "id": id_,
        "records": len(infos),
        "newest_write": newest.updated_at.isoformat() if newest is not None else None,
        "newest_key": newest.key if newest is not None else None,
        "age_seconds": round((now - newest.updated_at).total_seconds(), 3) if newest else None,
    }


def _durability_line(durability: Durability) -> str:
    """The line under the status table: what an acknowledged write means here."""
    ack = {True: "durable", False: "NOT durable", None: "unknown"}[durability.durable_on_ack]
    return f"durability ({durability.store_kind}): acknowledged writes {ack}: {durability.summary}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def list_records(ctx: typer.Context, store: Store = DEFAULT_STORE_NAME, json_: Json = False) -> None:
    """List the records of a store: key, size in bytes, last write, version, content type."""

    async def body(storage: StorageBackend) -> list[RecordInfo]:
        return await (await find_store(storage, store)).list_keys()

    infos = run(ctx, body)
    if json_:
        print_json(
            [
                {
                    "key": i.key,
                    "size": i.size,
                    "updated_at": i.updated_at.isoformat(),
                    "version": i.version,
                    "content_type": i.content_type,
                }
                for i in infos
            ]
        )
        return
    if not infos:
        warn(f"store {store!r} holds no records")
        return
    print_table(
        f"store {store!r}",
        ["key", "size", "updated at", "version", "content type"],
        [(i.key, i.size, timestamp(i.updated_at), i.version, i.content_type) for i in infos],
    )


def show(ctx: typer.Context, key: Key, store: Store = DEFAULT_STORE_NAME, raw: Raw = False) -> None:
    """Print the record under KEY: JSON pretty-printed, text as text, bytes as base64.

    The JSON is highlighted on a terminal and plain when piped. --raw writes the
    stored bytes exactly as they are.
    """

    async def body(storage: StorageBackend) -> tuple[StoredRecord, str | None]:
        kvs = await find_store(storage, store)
        record = await require_record(kvs, key)  # without the key that sealed it: an error naming its id
        return record, await sealed_with(kvs, key) if storage.key_ring is not None else None

    record, key_id = run(ctx, body)
    if key_id is not None and not raw:
        warn(f"decrypted with encryption key {key_id!r} of RECOVERABLE_STATE_ENCRYPTION_KEYS")
    print_record(record, raw=raw)


def history(ctx: typer.Context, key: Key, store: Store = DEFAULT_STORE_NAME, json_: Json = False) -> None:
    """List the snapshots kept of KEY, newest first: version, time, size.

    A state keeps its last N snapshots when it is created with history=N; restore
    one with `restore KEY --to VERSION`.
    """

    async def body(storage: StorageBackend) -> list[StoredRecord]:
        kvs = await find_store(storage, store)
        snapshots = await kvs.get_history(key)
        if not snapshots:
            await require_record(kvs, key)  # an unknown key is an error, a key without history is not
        return snapshots

    snapshots = run(ctx, body)
    if json_:
        print_json(
            [
                {
                    "version": s.version,
                    "updated_at": s.updated_at.isoformat(),
                    "size": len(s.value),
                    "content_type": s.content_type,
                }
                for s in snapshots
            ]
        )
        return
    if not snapshots:
        warn(
            f"no snapshots are kept of key {key!r} in store {store!r} "
            "(a state keeps them when created with history=N)"
        )
        return
    print_table(
        f"history of {key!r} in store {store!r}",
        ["version", "updated at", "size", "content type"],
        [(s.version, timestamp(s.updated_at), len(s.value), s.content_type) for s in snapshots],
    )


def quarantine(
    ctx: typer.Context,
    key: Annotated[
        str | None,
        typer.Argument(
            metavar="KEY",
            help="Show what was set aside from this key (the newest), or under this quarantine key.",
            show_default=False,
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option("--store", "-s", metavar="NAME", help="Only what was set aside from this store."),
    ] = None,
    json_: Json = False,
    raw: Raw = False,
) -> None:
    """List the records set aside as unusable (a bad record found at start); with KEY, show one.

    They live in the store named after the original one plus ".quarantine",
    under "<original key>@<UTC time it was set aside>".
    """

    async def body(storage: StorageBackend) -> list[SetAside] | tuple[SetAside, StoredRecord]:
        found = await set_aside(storage, store)
        if key is None:
            return found
        chosen = pick(found, key, store)
        return chosen, await require_record(chosen.kvs, chosen.info.key)

    result = run(ctx, body)
    if isinstance(result, tuple):
        item, record = result
        if not raw:
            warn(
                f"set aside from store {item.store!r}, key {item.key!r} at {item.when or 'an unknown time'}: "
                f"{len(record.value)} bytes of {record.content_type}"
            )
        print_record(record, raw=raw)
        return
    if json_:
        print_json(
            [
                {
                    "store": q.store,
                    "key": q.key,
                    "set_aside_at": q.when,
                    "size": q.info.size,
                    "content_type": q.info.content_type,
                    "quarantine_store": q.kvs.label,
                    "quarantine_key": q.info.key,
                }
                for q in result
            ]
        )
        return
    if not result:
        warn("nothing is in quarantine")
        return
    print_table(
        "set aside as unusable",
        ["store", "key", "set aside at", "size", "content type"],
        [(q.store, q.key, q.when, q.info.size, q.info.content_type) for q in result],
    )
