"""Help that reads like other command lines: `show [OPTIONS] KEY`, flags without a type.

Recent typer releases print a flag's type (`--debug <bool>`) and wrap required
arguments in braces in the usage line (`show [OPTIONS] {KEY}`). A flag takes no
value, so there is nothing to show; a bare KEY is the usual way to write a
required argument.
"""

from __future__ import annotations

from typing import Any

import typer.core


def _plain(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # shown as the type column: empty
    return params


def _unbraced(pieces: list[str]) -> list[str]:
    return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


class PlainCommand(typer.core.TyperCommand):
    """A command whose help shows flags without a type and required arguments bare."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _unbraced(super().collect_usage_pieces(ctx))


class PlainGroup(typer.core.TyperGroup):
    """The top command, with the same plain help as `PlainCommand`."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _unbraced(super().collect_usage_pieces(ctx))
