"""The `recoverable-state` command line: look into and manage stored records.

Needs the `cli` extra (typer, rich): `pip install 'recoverable-state[cli]'`.
Run it as `recoverable-state --help` or `python -m recoverable_state.cli --help`.

The package imports typer only when the command runs, so that the console script
a plain install puts on PATH can say what is missing instead of a traceback.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typer import Typer

    app: Typer

__all__ = ["app", "installed_version", "main"]

INSTALL_HINT = "pip install 'recoverable-state[cli]'"
"""What to run when the command line's extra is missing."""

_EXTRA = ("typer", "rich")
"""The packages the `cli` extra brings."""


def installed_version() -> str:
    """The version of the installed `recoverable-state` distribution (what `--version` prints)."""
    try:
        return metadata.version("recoverable-state")
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def main() -> None:
    """Run the command line (the `recoverable-state` script); one line and exit 1 without the extra."""
    if sys.argv[1:] == ["--version"]:  # answered without the extra, as a plain install has it
        sys.stdout.write(f"recoverable-state {installed_version()}\n")
        return
    try:
        from ._app import main as run_app
    except ModuleNotFoundError as exc:
        if exc.name not in _EXTRA:
            raise
        missing = f"the recoverable-state command needs the cli extra ({exc.name} is missing)"
        sys.stderr.write(f"error: {missing}: {INSTALL_HINT}\n")
        sys.exit(1)
    run_app()


def __getattr__(name: str) -> Any:
    if name == "app":  # typer's app, for embedding and tests; needs the extra
        from ._app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
