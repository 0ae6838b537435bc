"""Export and import: records as JSON Lines, byte-exact both ways.

One line per record: `{"store": ..., "key": ..., "content_type": ..., <value>}`
where `<value>` is exactly one of

- `"value"`: the parsed JSON, when the record is JSON and its bytes are the
  compact form `json.dumps(value, ensure_ascii=False, separators=(",", ":"))`
  gives back (what states store), so that `jq .value` reads a state;
- `"text"`: the bytes as a string, when they are UTF-8 (JSON in any other
  spelling, text records);
- `"base64"`: the bytes in base64, otherwise.

Import writes back the very bytes and content type of each line: the round trip
is exact for every record, whatever store it goes to. History is not exported.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from rich.progress import Progress

from .._errors import InvalidKeyError, StorageError
from ..storage import KeyValueStore, RecordInfo, RecordWrite, StorageBackend, StoredRecord, check_key
from ._output import console, is_json
from ._runtime import CommandError

CHUNK = 500
"""Records read or written per batch."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of an export file."""

    store: str
    key: str
    content_type: str
    value: bytes


def _compact(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode_line(store: str, record: StoredRecord) -> str:
    """The export line of a record (without its newline)."""
    line: dict[str, Any] = {"store": store, "key": record.key, "content_type": record.content_type}
    data = record.value
    if is_json(record.content_type):
        try:
            parsed = json.loads(data)
            if _compact(parsed) == data:
                line["value"] = parsed
        except ValueError:  # not JSON, NaN, or a lone surrogate: keep the bytes as they are
            pass
    if "value" not in line:
        try:
            line["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            line["base64"] = base64.b64encode(data).decode("ascii")
    return json.dumps(line, ensure_ascii=False)


def decode_line(line: str, *, store: str | None) -> Entry:
    """The record an export line describes; `store` (when given) replaces the line's store.

    Raises ValueError saying what is wrong with the line.
    """
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    store = store if store is not None else _string(item, "store")
    key = _string(item, "key")
    content_type = _string(item, "content_type")
    kinds = [k for k in ("value", "text", "base64") if k in item]
    if len(kinds) != 1:
        raise ValueError('give exactly one of "value", "text" and "base64"')
    kind = kinds[0]
    if kind == "value":
        try:
            data = _compact(item["value"])
        except ValueError as exc:
            raise ValueError(f'"value" cannot be stored as JSON ({exc})') from None
    elif not isinstance(item[kind], str):
        raise ValueError(f'"{kind}" must be a string')
    elif kind == "text":
        data = item["text"].encode("utf-8")
    else:
        try:
            data = base64.b64decode(item["base64"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f'"base64" is not valid base64 ({exc})') from None
    try:
        check_key(key, store=store)
    except InvalidKeyError as exc:
        raise ValueError(str(exc)) from None
    return Entry(store, key, content_type, data)


def _string(item: dict[str, Any], name: str) -> str:
    got = item.get(name)
    if not isinstance(got, str):
        raise ValueError(f'"{name}" must be a string')
    return got


def read_entries(data: bytes, *, source: str, store: str | None) -> list[Entry]:
    """Every record of an export file; a bad line is a CommandError naming its number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"{source} is not UTF-8 text ({exc}); nothing was imported") from None
    entries = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            entries.append(decode_line(line, store=store))
        except (ValueError, UnicodeError) as exc:
            raise CommandError(f"{source}, line {number}: {exc}; nothing was imported") from None
    return entries


def _progress(description: str, total: int) -> tuple[Progress, Callable[[int], None]]:
    """A progress bar on stderr (shown only when stderr is a terminal) and its advance."""
    progress = Progress(console=console(stderr=True), transient=True)
    progress.disable = not progress.console.is_terminal
    task = progress.add_task(description, total=total)
    return progress, lambda n: progress.advance(task, n)


async def export_stores(stores: Sequence[KeyValueStore], out: TextIO) -> int:
    """Write every current record of `stores` to `out` as JSON Lines; return how many."""
    listings: list[tuple[KeyValueStore, list[RecordInfo]]] = [(s, await s.list_keys()) for s in stores]
    progress, advance = _progress("exporting", sum(len(infos) for _, infos in listings))
    written = 0
    with progress:
        for kvs, infos in listings:
            for start in range(0, len(infos), CHUNK):
                chunk = infos[start : start + CHUNK]
                records = await KeyValueStore.get_together([(kvs, info.key, False) for info in chunk])
                for r in records:
                    if isinstance(r, StorageError):
                        raise r
                lines = [encode_line(kvs.label, r) + "\n" for r in records if isinstance(r, StoredRecord)]
                out.write("".join(lines))  # a record deleted since the listing is skipped
                written += len(lines)
                advance(len(chunk))
    out.flush()
    return written


async def import_entries(storage: StorageBackend, entries: Sequence[Entry]) -> int:
    """Write every entry as the current record of its key (creating stores); return how many."""
    stores: dict[str, KeyValueStore] = {}
    for name in dict.fromkeys(entry.store for entry in entries):  # a bad name fails before any write
        stores[name] = await KeyValueStore.open(name=name, storage=storage)
    progress, advance = _progress("importing", len(entries))
    with progress:
        for start in range(0, len(entries), CHUNK):
            chunk = entries[start : start + CHUNK]
            puts: list[tuple[KeyValueStore, RecordWrite]] = [
                (stores[e.store], stores[e.store].prepare_put(e.key, e.value, e.content_type)) for e in chunk
            ]
            await KeyValueStore.put_together(puts)
            advance(len(chunk))
    return len(entries)
