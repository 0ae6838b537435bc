"""The commands that change stores: restore, reset, delete, export, import and rekey."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, TextIO

import typer

from ..storage import DEFAULT_STORE_NAME, StorageBackend
from ._output import is_json, plural, warn
from ._params import Key, Store, Yes
from ._rekey import RekeyReport, rekey_stores
from ._runtime import (
    CommandError,
    confirm,
    find_store,
    options_of,
    reported_errors,
    require_record,
    run,
    stores_named,
)
from ._transfer import check_file, export_stores, import_file


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


def reset(ctx: typer.Context, key: Key, store: Store = DEFAULT_STORE_NAME, yes: Yes = False) -> None:
    """Reset the state KEY to its default: remove its record and the snapshots kept of it.

    On its next start the worker finds nothing under KEY and starts from its
    default state, as after RecoverableState.reset(). Only for states (JSON
    records; `delete` removes any record). An unknown key is an error, as with
    `delete`: a typo must not pass for a reset. Stop the worker first: a worker
    holding the state gets StateOwnershipLost on its next write.
    """
    _remove(ctx, key, store, yes=yes, state_only=True)


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

    async def body(storage: StorageBackend, out: TextIO) -> tuple[int, int, int]:
        chosen = await stores_named(storage, None if all_stores else store or DEFAULT_STORE_NAME)
        return *await export_stores(chosen, out), len(chosen)

    with reported_errors(ctx), _output_file(output) as out:
        count, sealed, n_stores = run(ctx, lambda storage: body(storage, out))
    where = "stdout" if output == "-" else output
    warn(f"exported {plural(count, 'record')} from {plural(n_stores, 'store')} to {where}")
    if sealed:
        warn(
            f"{plural(sealed, 'record')} sealed in the store {'was' if sealed == 1 else 'were'} decrypted "
            f"with RECOVERABLE_STATE_ENCRYPTION_KEYS: {where} has them in clear; keep it as safe as the keys"
        )


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
    ring = options_of(ctx).key_ring
    sealing = f", sealed with encryption key {ring.current!r}" if ring is not None else ""
    typer.echo(f"imported {plural(count, 'record')} into {options_of(ctx).shown_url}{sealing}")


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


def rekey(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            "-s",
            metavar="NAME",
            help="Only this store (by default: every store).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be sealed again.")
    ] = False,
    yes: Yes = False,
) -> None:
    """Seal every record not sealed with the ring's current key again with it (key rotation).

    The ring is RECOVERABLE_STATE_ENCRYPTION_KEYS, the new key first: every key of
    the ring opens what it sealed, the first seals. Records stored in clear (from
    before encryption) are sealed too. Each record is written back only if no
    worker wrote it in between (those are left to the worker, whose writes seal
    with its own ring); a worker holding a rewritten record gets
    StateOwnershipLost on its next write, so rekey while the workers are stopped,
    or let records move to the new key as they are written. Kept history is not
    rewritten: the snapshots still under an older key are counted, and that key
    must stay in the ring until newer snapshots replace them.
    """
    ring = options_of(ctx).key_ring
    if ring is None:
        with reported_errors(ctx):
            raise CommandError(
                "rekey needs the key ring: set RECOVERABLE_STATE_ENCRYPTION_KEYS, the new key first "
                "(id:base64key,id:base64key,...)"
            )
    assert ring is not None

    async def body(storage: StorageBackend) -> RekeyReport:
        chosen = await stores_named(storage, store)
        if not dry_run:
            await confirm(
                f"Seal every record of {plural(len(chosen), 'store')} in {options_of(ctx).shown_url} "
                f"not sealed with key {ring.current!r} again with it (a worker holding one of them "
                "gets StateOwnershipLost on its next write)?",
                yes=yes,
            )
        return await rekey_stores(chosen, ring, dry_run=dry_run)

    report = run(ctx, body)
    for line in report.lines(ring, dry_run=dry_run):
        typer.echo(line)
    if report.failed:
        shown = "; ".join(report.failed[:5]) + ("; ..." if len(report.failed) > 5 else "")
        typer.echo(f"error: {plural(len(report.failed), 'record')} left as they are: {shown}", err=True)
        raise typer.Exit(1)
