"""The arguments and options several commands share, typed once."""

from __future__ import annotations

from typing import Annotated

import typer

Key = Annotated[str, typer.Argument(metavar="KEY", help="The record's key.", show_default=False)]
Store = Annotated[str, typer.Option("--store", "-s", metavar="NAME", help="The store, by name (or id).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
Raw = Annotated[bool, typer.Option("--raw", help="Write the exact stored bytes to stdout, nothing else.")]
