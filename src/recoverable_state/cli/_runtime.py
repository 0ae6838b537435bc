"""How every command runs: the global options, the storage it opens, one-line errors."""

from __future__ import annotations

import contextlib
import re
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import anyio
import typer

from .. import RecoverableStateError, StoreNotFoundError
from ..storage import (
    CHAIN_CONTENT_TYPE,
    KeyRing,
    KeyValueStore,
    RecordRead,
    SQLiteBackend,
    StorageBackend,
    StoredRecord,
    open_backend,
    sealed_key_id,
    unpack_chain,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Options:
    """The global options every command runs with."""

    storage_url: str
    timeout: float
    debug: bool
    key_ring: KeyRing | None = field(default=None)
    """The ring from RECOVERABLE_STATE_ENCRYPTION_KEYS: records are opened and sealed with it."""

    @property
    def shown_url(self) -> str:
        """The storage URL as messages show it: without its password."""
        return redact(self.storage_url)


def redact(url: str) -> str:
    """`url` without a password, in its user part (`user:secret@`) or its query (`password=`)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all: shown as it is, it holds no user part to hide
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k.lower() != "password"]
    if netloc == parts.netloc and len(kept) == len(pairs):
        return url  # nothing to hide: as written (geturl would respell sqlite:////abs/path)
    return parts._replace(netloc=netloc, query=urlencode(kept)).geturl()


def local_path(url: str) -> tuple[str, Path] | None:
    """Where a `sqlite:` database or a `file:` root lives, read from the URL as documented; else None."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite" and url.lower().startswith("sqlite:///"):
        return "SQLite database", Path(unquote(url[len("sqlite:///") :]))
    if scheme == "file":
        parts = urlsplit(url)
        return "file store root", Path(unquote(parts.netloc + parts.path))
    return None


class CommandError(Exception):
    """A failure the user can act on (an unknown key, a bad input line): one line, no traceback."""


def run(ctx: typer.Context, body: Callable[[StorageBackend], Awaitable[T]], *, creates: bool = False) -> T:
    """Run `body` on the storage the options name, close it, and turn any failure into one line.

    Without `creates`, a SQLite database that does not exist is an error rather
    than a new empty file: reading commands never leave files behind.
    """
    with reported_errors(ctx):
        return anyio.run(_with_storage, options_of(ctx), body, creates)


@contextlib.contextmanager
def reported_errors(ctx: typer.Context) -> Iterator[None]:
    """Turn any failure inside into one line on stderr and exit 1 (see `fail`)."""
    try:
        yield
    except (typer.Exit, typer.Abort, BrokenPipeError):  # the last: see `main`
        raise
    except Exception as exc:
        fail(exc, debug=options_of(ctx).debug)


def options_of(ctx: typer.Context) -> Options:
    """The global options, set by the app's callback before any command runs."""
    options = ctx.find_object(Options)
    assert options is not None, "the app callback sets the options"
    return options


async def _with_storage(options: Options, body: Callable[[StorageBackend], Awaitable[T]], creates: bool) -> T:
    # Redis and PostgreSQL retry an unreachable server this long before giving up; SQLite
    # waits this long for a database another process holds.
    local = local_path(options.storage_url)
    if not creates and local is not None and not local[1].exists():
        what, path = local
        raise CommandError(
            f"there is no {what} at {str(path)!r}: check --storage-url or "
            "RECOVERABLE_STATE_STORAGE_URL (relative paths start at the working directory)"
        )
    storage = open_backend(
        options.storage_url, retry_timeout=options.timeout, encryption_keys=options.key_ring
    )
    if isinstance(storage, SQLiteBackend):  # --timeout bounds its wait for another process too
        storage.busy_timeout = options.timeout
    try:
        return await body(storage)
    finally:
        with anyio.CancelScope(shield=True):
            await storage.aclose()


def fail(exc: BaseException, *, debug: bool) -> NoReturn:
    """Print `exc` as one line on stderr (after its traceback with --debug) and exit 1."""
    if debug:
        traceback.print_exception(exc)
    typer.echo(f"error: {describe(exc)}", err=True)
    raise typer.Exit(1)


def describe(exc: BaseException) -> str:
    """One line saying what went wrong; what the library raises is already phrased for users."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = _PRIVATE_NAME.sub("", " ".join(str(exc).split()))  # server errors can span lines
    name = _public_name(type(exc))
    if isinstance(exc, RecoverableStateError | CommandError | OSError):
        return text or name
    return f"{name}: {text} (unexpected; run with --debug for the traceback)"


_PRIVATE_NAME = re.compile(r"(?<![\w.])_[A-Za-z]\w*: ")
"""A private class name a message quotes (`_Unavailable: ...`): it tells a user nothing."""


def _public_name(cls: type[BaseException]) -> str:
    """The name of the nearest class of `cls` that is not private."""
    return next(c.__name__ for c in cls.__mro__ if not c.__name__.startswith("_"))


async def find_store(storage: StorageBackend, name: str) -> KeyValueStore:
    """The store with this name (or id), which must exist: a typo must not create a new store."""
    stores = await storage.list_stores()
    found = next((s for s in stores if s.name == name), None) or next(
        (s for s in stores if s.id == name), None
    )
    if found is None:
        names = ", ".join(repr(s.label) for s in stores[:10]) + (", ..." if len(stores) > 10 else "")
        raise StoreNotFoundError(
            f"no such store in {redact(storage.url)} (stores there: {names or 'none'})", store=name
        )
    return KeyValueStore(found, storage)


async def stores_named(storage: StorageBackend, name: str | None) -> list[KeyValueStore]:
    """The store named `name` (which must exist), or every store when `name` is None."""
    if name is not None:
        return [await find_store(storage, name)]
    return [KeyValueStore(info, storage) for info in await storage.list_stores()]


async def require_record(kvs: KeyValueStore, key: str) -> StoredRecord:
    """The record under `key`, which must exist."""
    record = await kvs.get_record(key)
    if record is None:
        raise CommandError(f"no record under key {key!r} in store {kvs.label!r}")
    return record


async def confirm(question: str, *, yes: bool) -> None:
    """Ask before changing data (unless `yes`); a no exits 1 with nothing changed."""
    if yes:
        return
    if not await anyio.to_thread.run_sync(lambda: typer.confirm(question, err=True)):
        typer.echo("nothing changed", err=True)
        raise typer.Exit(1)


async def sealed_with(kvs: KeyValueStore, key: str) -> str | None:
    """The id of the key the record under `key` is sealed with as stored, or None (in clear, absent).

    Read from the stored record itself, past the layer that opens it: what was
    sealed is told from what the store holds, not from what opening gave.
    """
    found = (await kvs.storage.read_batch([RecordRead(kvs.id, key)]))[0]
    if not isinstance(found, StoredRecord):
        return None
    if found.content_type == CHAIN_CONTENT_TYPE:  # a snapshot and its deltas: the snapshot tells
        return sealed_key_id(unpack_chain(found.value)[0][1])
    return sealed_key_id(found.content_type)
