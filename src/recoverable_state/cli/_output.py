"""What commands print: tables for people, JSON for scripts, records by their content type."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..storage import StoredRecord, is_json_content_type

_PIPED_WIDTH = 10_000
"""Console width when stdout is not a terminal: piped tables are never cut short."""


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); as wide as needed when it is not a terminal."""
    out = Console(stderr=stderr)
    if not out.is_terminal:
        out.width = _PIPED_WIDTH
    return out


def timestamp(moment: datetime) -> str:
    """A stored time as ISO 8601 in UTC, to the second, for tables."""
    return moment.isoformat(timespec="seconds")


def plural(count: int, noun: str) -> str:
    """`1 record`, `2 records`: a count and its noun, in the right number."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows as a table; numbers are right-aligned.

    Every cell and the title are plain text: a key such as `[red]x[/red]` or `[/]`
    is shown as it is, never read as rich markup.
    """
    table = Table(title=Text(title) if title is not None else None, title_justify="left")
    for n, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(row[n], int) for row in rows)
        table.add_column(Text(name), justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    console().print(table)


def print_json(data: Any) -> None:
    """Print data as indented JSON for scripts (no colour, no wrapping)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def is_json(content_type: str) -> bool:
    """Whether a content type says JSON (`application/json`, `...+json`, with parameters)."""
    return is_json_content_type(content_type)  # the library's own rule, as it decodes records


def print_record(record: StoredRecord, *, raw: bool = False) -> None:
    """Print a record's value: JSON pretty-printed, text as text, bytes as a note with base64.

    With `raw`, the exact stored bytes go to stdout and nothing else.
    """
    if raw:
        sys.stdout.buffer.write(record.value)
        sys.stdout.buffer.flush()
        return
    out = console()
    if is_json(record.content_type):
        try:
            pretty = json.dumps(json.loads(record.value), indent=2, ensure_ascii=False)
        except ValueError as exc:
            warn(f"key {record.key!r}: the record says JSON but is not valid JSON ({exc}); shown as text")
        else:
            if out.is_terminal:
                from rich.syntax import Syntax  # pygments: only worth loading for a terminal

                out.print(Syntax(pretty, "json", background_color="default", word_wrap=True))
            else:
                _write(pretty)
            return
    if record.content_type.startswith("text/") or is_json(record.content_type):  # or JSON that is not
        text = record.value.decode("utf-8", errors="replace")
        if out.is_terminal:
            out.print(text, markup=False, highlight=False)
        else:
            _write(text)
        return
    warn(
        f"key {record.key!r} holds {len(record.value)} bytes of {record.content_type}, "
        "printed as base64 below; --raw writes the bytes themselves"
    )
    _write(base64.encodebytes(record.value).decode("ascii").rstrip("\n"))


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """A note for the user on stderr, which leaves stdout to the data."""
    sys.stderr.write(f"note: {message}\n")
    sys.stderr.flush()
