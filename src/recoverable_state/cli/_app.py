"""The `recoverable-state` commands: look into stores, status, export, import, restore, reset."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any, TextIO

import typer
from pydantic import ValidationError

from .. import Configuration
from ..storage import (
    DEFAULT_STORE_NAME,
    KeyValueStore,
    RecordInfo,
    StorageBackend,
    StoredRecord,
)
from ._help import PlainCommand, PlainGroup
from ._output import is_json, plural, print_json, print_record, print_table, timestamp, warn
from ._quarantine import SetAside, pick, set_aside
from ._runtime import (
    CommandError,
    Options,
    confirm,
    fail,
    find_store,
    options_of,
    reported_errors,
    require_record,
    run,
)
from ._transfer import check_file, export_stores, import_file

app = typer.Typer(
    name="recoverable-state",
    help=(
        "Look into and manage what recoverable-state stores: list stores and records, show a "
        "state, its history and the quarantine, export and import, restore, reset and delete."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=PlainGroup,
)

Key = Annotated[str, typer.Argument(metavar="KEY", help="The record's key.", show_default=False)]
Store = Annotated[str, typer.Option("--store", "-s", metavar="NAME", help="The store, by name (or id).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
Raw = Annotated[bool, typer.Option("--raw", help="Write the exact stored bytes to stdout, nothing else.")]


def _print_version(value: bool) -> None:
    if value:
        from . import installed_version

        typer.echo(f"recoverable-state {installed_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    storage_url: Annotated[
        str | None,
        typer.Option(
            "--storage-url",
            metavar="URL",
            show_default=False,
            help="Where the stores live, as the library takes it: sqlite:///./rel/path.sqlite3, "
            "sqlite:////abs/path.sqlite3, file:///abs/dir, redis://host:port/db, "
            "postgresql://user@host:port/db. Default: RECOVERABLE_STATE_STORAGE_URL, "
            "else sqlite:///./storage/state.sqlite3.",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            min=0.0,
            help="How long to retry an unreachable Redis or PostgreSQL server.",
        ),
    ] = 5.0,
    debug: Annotated[bool, typer.Option("--debug", help="On an error, show its traceback too.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the installed version of recoverable-state and exit.",
        ),
    ] = False,
) -> None:
    """The global options, read before any command."""
    if storage_url is None:
        try:
            storage_url = Configuration().storage_url
        except ValidationError as exc:
            error = CommandError(
                "a RECOVERABLE_STATE_* environment variable is not valid: " + _fields(exc)
            )
            error.__cause__ = exc
            fail(error, debug=debug)
    ctx.obj = Options(storage_url=storage_url, timeout=timeout, debug=debug)


def _fields(exc: ValidationError) -> str:
    """Each failing setting and what is wrong with it, on one line."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


# -- looking ----------------------------------------------------------------


@app.command(cls=PlainCommand)
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


@app.command(cls=PlainCommand)
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
    """Show, per store, the newest write, which key it was and how many records: spot a stuck worker."""

    async def body(storage: StorageBackend) -> list[tuple[str | None, str, list[RecordInfo]]]:
        return [(s.name, s.id, await storage.list_records(s.id)) for s in await storage.list_stores()]

    found = run(ctx, body)
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for name, id_, infos in found:
        newest = max(infos, key=lambda i: i.updated_at, default=None)
        rows.append(
            {
                "name": name,
                "id": id_,
                "records": len(infos),
                "newest_write": newest.updated_at.isoformat() if newest is not None else None,
                "newest_key": newest.key if newest is not None else None,
                "age_seconds": round((now - newest.updated_at).total_seconds(), 3) if newest else None,
            }
        )
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
    if stale:
        names = ", ".join(repr(r["name"] or r["id"]) for r in stale)
        warn(f"not written for more than {stale_after:g} s: {names}")
        raise typer.Exit(STALE_EXIT)


STALE_EXIT = 3
"""Exit code of `status --stale-after` when a store was not written recently enough."""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@app.command("list", cls=PlainCommand)
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


@app.command(cls=PlainCommand)
def show(ctx: typer.Context, key: Key, store: Store = DEFAULT_STORE_NAME, raw: Raw = False) -> None:
    """Print the record under KEY: JSON pretty-printed, text as text, bytes as base64.

    The JSON is highlighted on a terminal and plain when piped. --raw writes the
    stored bytes exactly as they are.
    """

    async def body(storage: StorageBackend) -> StoredRecord:
        return await require_record(await find_store(storage, store), key)

    print_record(run(ctx, body), raw=raw)


@app.command(cls=PlainCommand)
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


# -- changing ---------------------------------------------------------------


@app.command(cls=PlainCommand)
def restore(
    ctx: typer.Context,
    key: Key,
    to: Annotated[
        int, typer.Option("--to", metavar="VERSION", help="The kept snapshot to restore (see `history`).")
    ],
    store: Store = DEFAULT_STORE_NAME,
) -> None:
    """Write a kept snapshot of KEY back as its current record.

    The snapshot's bytes and content type replace whatever is stored now, as a
    new version; the kept snapshots stay as they are. A worker holding this state
    right now gets StateOwnershipLost on its next write and stops persisting it:
    that is by design, its snapshot is no longer the newest. Restart the worker
    to load the restored state.
    """

    async def body(storage: StorageBackend) -> int:
        kvs = await find_store(storage, store)
        snapshots = await kvs.get_history(key)
        chosen = next((s for s in snapshots if s.version == to), None)
        if chosen is None:
            if not snapshots:
                await require_record(kvs, key)
            kept = ", ".join(str(s.version) for s in snapshots) or "none"
            raise CommandError(
                f"no snapshot of version {to} is kept of key {key!r} in store {kvs.label!r} "
                f"(kept versions: {kept})"
            )
        outcome = await kvs.put_record(key, chosen.value, chosen.content_type)
        return outcome.version

    version = run(ctx, body)
    typer.echo(
        f"restored key {key!r} in store {store!r} to its snapshot of version {to}: now version {version}"
    )


@app.command(cls=PlainCommand)
def reset(ctx: typer.Context, key: Key, store: Store = DEFAULT_STORE_NAME, yes: Yes = False) -> None:
    """Reset the state KEY to its default: remove its record and the snapshots kept of it.

    On its next start the worker finds nothing under KEY and starts from its
    default state, as after RecoverableState.reset(). Only for states (JSON
    records; `delete` removes any record). An unknown key is an error, as with
    `delete`: a typo must not pass for a reset. Stop the worker first: a worker
    holding the state gets StateOwnershipLost on its next write.
    """
    _remove(ctx, key, store, yes=yes, state_only=True)


@app.command(cls=PlainCommand)
def delete(ctx: typer.Context, key: Key, store: Store = DEFAULT_STORE_NAME, yes: Yes = False) -> None:
    """Delete the record under KEY (a state, text or bytes) and the snapshots kept of it.

    An unknown key is an error. A worker holding the record gets
    StateOwnershipLost on its next write.
    """
    _remove(ctx, key, store, yes=yes, state_only=False)


def _remove(ctx: typer.Context, key: str, store: str, *, yes: bool, state_only: bool) -> None:
    async def body(storage: StorageBackend) -> str:
        kvs = await find_store(storage, store)
        where = f"key {key!r} in store {kvs.label!r}"
        record = await require_record(kvs, key)
        if state_only and not is_json(record.content_type):
            raise CommandError(f"{where} holds {record.content_type}, not a state; use `delete` to remove it")
        kept = len(await kvs.get_history(key))
        verb = "Reset the state" if state_only else "Delete the record"
        await confirm(
            f"{verb} under {where} of {options_of(ctx).shown_url} "
            f"(version {record.version}, {plural(len(record.value), 'byte')}, "
            f"{plural(kept, 'kept snapshot')})?",
            yes=yes,
        )
        if not await kvs.delete_record(key, expected_version=record.version):
            raise CommandError(
                f"{where} changed while you were asked; nothing was removed, run the command again"
            )
        return f"{'reset' if state_only else 'deleted'} {where} ({plural(kept, 'kept snapshot')} removed too)"

    typer.echo(run(ctx, body))


# -- moving -----------------------------------------------------------------


@app.command(cls=PlainCommand)
def export(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            "-s",
            metavar="NAME",
            help="The store to export (by default: default).",
            show_default=False,
        ),
    ] = None,
    all_stores: Annotated[bool, typer.Option("--all", help="Export every store.")] = False,
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="FILE", help="Where to write; '-' is stdout.")
    ] = "-",
) -> None:
    """Export the current records of a store (or --all) as JSON Lines, byte-exact.

    One line per record: {"store", "key", "content_type"} and the value as one of
    "value" (the JSON itself, when the record is JSON in compact form, as states
    are), "text" (any other UTF-8 record, the exact text) or "base64" (anything
    else); a last line {"end", "records"} says the export is whole. `import`
    writes back the same bytes and content type. Kept history is not exported.
    Records are read and written a page at a time; a FILE appears only once the
    export is complete.
    """
    if store is not None and all_stores:
        raise typer.BadParameter("give --store or --all, not both")

    async def body(storage: StorageBackend, out: TextIO) -> tuple[int, int]:
        if all_stores:
            chosen = [KeyValueStore(info, storage) for info in await storage.list_stores()]
        else:
            chosen = [await find_store(storage, store or DEFAULT_STORE_NAME)]
        return await export_stores(chosen, out), len(chosen)

    with reported_errors(ctx), _output_file(output) as out:
        count, n_stores = run(ctx, lambda storage: body(storage, out))
    where = "stdout" if output == "-" else output
    warn(f"exported {plural(count, 'record')} from {plural(n_stores, 'store')} to {where}")


@contextlib.contextmanager
def _output_file(output: str) -> Iterator[TextIO]:
    """stdout for '-'; else a file that takes its name only when everything is written."""
    if output == "-":
        yield sys.stdout
        return
    target = Path(output)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "w", encoding="utf-8", newline="\n") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@app.command("import", cls=PlainCommand)
def import_records(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE", help="A file written by `export`; '-' reads stdin.", show_default=False
        ),
    ],
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            "-s",
            metavar="NAME",
            help="Import every record into this store, whatever its line says.",
        ),
    ] = None,
) -> None:
    """Import records written by `export`: each becomes the current record of its key.

    Stores are created as needed; a record already stored under a key is
    replaced (a worker holding it gets StateOwnershipLost on its next write). The
    whole file is checked first: a bad line, or a file cut short (its last line
    is not the trailer `export` writes, or counts other records), imports
    nothing. Each store's records are written in batches, all of a store in one
    when they fit in one; if a write fails, the error says exactly which records
    were written. The file is read line by line, twice (stdin is kept in a
    temporary file for that).
    """
    name = "stdin" if file == "-" else file
    with reported_errors(ctx), _input_file(file) as source:
        per_store = check_file(source, name=name, store=store)
        source.seek(0)
        total = sum(per_store.values())
        count = run(
            ctx,
            lambda storage: import_file(storage, source, stores=list(per_store), total=total, store=store),
            creates=True,
        )
    typer.echo(f"imported {plural(count, 'record')} into {options_of(ctx).shown_url}")


@contextlib.contextmanager
def _input_file(file: str) -> Iterator[IO[bytes]]:
    """The file, opened to read bytes; for '-', stdin copied to a temporary file (read twice)."""
    if file != "-":
        with open(file, "rb") as source:
            yield source
        return
    with tempfile.TemporaryFile() as copy:
        while chunk := sys.stdin.buffer.read(1024 * 1024):
            copy.write(chunk)
        copy.seek(0)
        yield copy


# -- quarantine ---------------------------------------------------------------


@app.command(cls=PlainCommand)
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


def main() -> None:
    """Run the command line (the `recoverable-state` script), with typer installed."""
    try:
        app(prog_name="recoverable-state")
    except BrokenPipeError:
        # Whoever read stdout has gone (`... | head`): stop quietly, as other tools do,
        # with stdout on /dev/null so that the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
