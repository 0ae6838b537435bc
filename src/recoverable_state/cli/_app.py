"""The `recoverable-state` command line: the app, its global options, its commands, `main`."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from .. import Configuration, StorageError
from ..storage import KeyRing
from . import _changing, _looking
from ._help import PlainCommand, PlainGroup
from ._runtime import CommandError, Options, fail

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
            help="How long to retry an unreachable Redis or PostgreSQL server, or to wait for a SQLite "
            "database another process holds.",
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
    try:
        config = Configuration()
    except ValidationError as exc:
        error = CommandError("a RECOVERABLE_STATE_* environment variable is not valid: " + _fields(exc))
        error.__cause__ = exc
        fail(error, debug=debug)
    ring = None
    if config.encryption_keys is not None:
        try:
            ring = KeyRing.parse(config.encryption_keys.get_secret_value())
        except (ValueError, StorageError) as exc:  # the messages name ids, never key material
            fail(CommandError(f"RECOVERABLE_STATE_ENCRYPTION_KEYS is not valid: {exc}"), debug=False)
    url = storage_url if storage_url is not None else config.storage_url
    ctx.obj = Options(storage_url=url, timeout=timeout, debug=debug, key_ring=ring)


def _fields(exc: ValidationError) -> str:
    """Each failing setting and what is wrong with it, on one line."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


# -- looking ----------------------------------------------------------------


# The commands, in the order `--help` lists them. Each lives in the module of its kind
# (looking, changing); they are registered here so that those modules need no app.
for command, name in (
    (_looking.stores, None),
    (_looking.status, None),
    (_looking.list_records, "list"),
    (_looking.show, None),
    (_looking.history, None),
    (_changing.restore, None),
    (_changing.reset, None),
    (_changing.delete, None),
    (_changing.export, None),
    (_changing.import_records, "import"),
    (_changing.rekey, None),
    (_looking.quarantine, None),
):
    app.command(name, cls=PlainCommand)(command)


def main() -> None:
    """Run the command line (the `recoverable-state` script), with typer installed."""
    try:
        app(prog_name="recoverable-state")
    except BrokenPipeError:
        # Whoever read stdout has gone (`... | head`): stop quietly, as other tools do,
        # with stdout on /dev/null so that the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
