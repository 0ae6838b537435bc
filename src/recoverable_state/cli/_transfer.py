"""Export and import: records as JSON Lines, byte-exact both ways, streamed.

One line per record: `{"store": ..., "key": ..., "content_type": ..., <value>}`
where `<value>` is exactly one of

- `"value"`: the parsed JSON, when the record is JSON and its bytes are the
  compact form `json.dumps(value, ensure_ascii=False, separators=(",", ":"))`
  gives back (what states store), so that `jq .value` reads a state;
- `"text"`: the bytes as a string, when they are UTF-8 (JSON in any other
  spelling, text records);
- `"base64"`: the bytes in base64, otherwise.

The last line is a trailer, `{"end": "recoverable-state export", "records": N}`:
a file cut short (at a line boundary or not) has no trailer or the wrong count,
and import refuses it before writing anything.

Import writes back the very bytes and content type of each line: the round trip
is exact for every record, whatever store it goes to. History is not exported.
Both ways stream: records are read and written a page at a time (at most
`PAGE_RECORDS` records and about `PAGE_BYTES` bytes), so memory stays flat
whatever the size of the store.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TextIO

from rich.progress import Progress

from .. import InvalidKeyError, StorageError
from ..storage import (
    KeyValueStore,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    WriteOutcome,
    check_key,
    materialise,
    sealed_key_id,
)
from ._output import console, is_json, plural
from ._runtime import CommandError

PAGE_RECORDS = 500
"""The most records read or written in one batch."""

PAGE_BYTES = 8 * 1024 * 1024
"""A page ends once its records hold this many bytes (a single bigger record is a page alone)."""

TRAILER_MARK = "recoverable-state export"
"""The `"end"` of the trailer line, which says the export is complete and how many records it holds."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of an export file."""

    store: str
    key: str
    content_type: str
    value: bytes
    line: int
    """Its line number in the file (1 for the first line)."""


def _compact(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def trailer_line(records: int) -> str:
    """The last line of an export of `records` records (without its newline)."""
    return json.dumps({"end": TRAILER_MARK, "records": records})


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


def decode_line(line: str, *, store: str | None, number: int = 0) -> Entry | int:
    """The record an export line describes, or the record count of the trailer line.

    `store` (when given) replaces the line's store. Raises ValueError saying what
    is wrong with the line.
    """
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    if "end" in item:
        count = item.get("records")
        if item["end"] != TRAILER_MARK or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f'a trailer line must read {{"end": "{TRAILER_MARK}", "records": <count>}}')
        return count
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
    return Entry(store, key, content_type, data, number)


def _string(item: dict[str, Any], name: str) -> str:
    got = item.get(name)
    if not isinstance(got, str):
        raise ValueError(f'"{name}" must be a string')
    return got


def _lines(source: IO[bytes], name: str, store: str | None) -> Iterator[Entry | int]:
    """Decode `source` line by line; a bad line is a CommandError naming its number."""
    for number, raw in enumerate(source, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(
                f"{name}, line {number}: not UTF-8 text ({exc}); nothing was imported"
            ) from None
        if not line.strip():
            continue
        try:
            yield decode_line(line, store=store, number=number)
        except (ValueError, UnicodeError) as exc:
            raise CommandError(f"{name}, line {number}: {exc}; nothing was imported") from None


def check_file(source: IO[bytes], *, name: str, store: str | None) -> Counter[str]:
    """Read a whole export file once, keeping nothing but counts; return the records per store.

    Refuses (CommandError) a bad line, and a file without its trailer or whose
    trailer counts other records than it holds: an export cut short.
    """
    per_store: Counter[str] = Counter()
    trailer: int | None = None
    for item in _lines(source, name, store):
        if trailer is not None:
            raise CommandError(f"{name}: records follow the trailer line; nothing was imported")
        if isinstance(item, int):
            trailer = item
        else:
            per_store[item.store] += 1
    found = sum(per_store.values())
    if trailer is None:
        raise CommandError(
            f"{name} ends without the trailer line `export` writes last: it was cut short "
            f"(or not written by `export`); nothing was imported"
        )
    if trailer != found:
        raise CommandError(
            f"{name} holds {plural(found, 'record')} but its trailer line says {trailer}: "
            "it is not whole; nothing was imported"
        )
    return per_store


def _progress(description: str, total: int | None) -> tuple[Progress, Callable[[int], None]]:
    """A progress bar on stderr (shown only when stderr is a terminal) and its advance."""
    progress = Progress(console=console(stderr=True), transient=True)
    progress.disable = not progress.console.is_terminal
    task = progress.add_task(description, total=total)
    return progress, lambda n: progress.advance(task, n)


async def export_stores(stores: Sequence[KeyValueStore], out: TextIO) -> tuple[int, int]:
    """Write every current record of `stores` to `out` as JSON Lines, a page at a time.

    Returns how many records were written, and how many of them are sealed in
    the store (written to `out` opened, in clear). The trailer line comes last,
    once every record is written.
    """
    progress, advance = _progress("exporting", None)
    written = sealed = 0
    with progress:
        for kvs in stores:
            infos = await kvs.list_keys()  # keys, sizes and times: no values
            sealed += sum(sealed_key_id(info.content_type) is not None for info in infos)
            start = 0
            while start < len(infos):
                end, size = start, 0
                while end < len(infos) and end - start < PAGE_RECORDS and (end == start or size < PAGE_BYTES):
                    size += infos[end].size
                    end += 1
                page = [(kvs, info.key, False) for info in infos[start:end]]
                records = await KeyValueStore.get_together(page)
                for record in records:
                    if isinstance(record, StorageError):
                        raise record
                    if record is not None:  # a record deleted since the listing is skipped
                        out.write(encode_line(kvs.label, materialise(record, store=kvs.label)) + "\n")
                        written += 1
                advance(end - start)
                start = end
        out.write(trailer_line(written) + "\n")
    out.flush()
    return written, sealed


@dataclass
class ImportReport:
    """What an import has written so far, to say exactly that when it stops part way."""

    applied: Counter[str] = field(default_factory=Counter)
    """Records written, per store."""
    last_line: int = 0
    """Every record on a line up to this one is written."""

    def applied_text(self) -> str:
        total = sum(self.applied.values())
        if not total:
            return "nothing was imported"
        stores = ", ".join(f"{name!r}: {n}" for name, n in sorted(self.applied.items()))
        lines = f"every one on lines 1-{self.last_line}"
        return f"imported {plural(total, 'record')} before that, {lines} ({stores})"


async def import_file(
    storage: StorageBackend, source: IO[bytes], *, stores: Sequence[str], total: int, store: str | None
) -> int:
    """Write every record of a checked export file, one page (of one store) per batch; return how many.

    A store whose records fit in one page is written in one batch: all of them
    or none. When a batch fails, the CommandError says exactly which records
    were written and which were not.
    """
    opened: dict[str, KeyValueStore] = {}
    for name in stores:  # a bad store name fails before any write
        opened[name] = await KeyValueStore.open(name=name, storage=storage)
    report = ImportReport()
    progress, advance = _progress("importing", total)
    with progress:
        page: list[Entry] = []
        size = 0
        for item in _lines(source, "the file", store):
            if isinstance(item, int):
                break
            if page and (item.store != page[0].store or len(page) >= PAGE_RECORDS or size >= PAGE_BYTES):
                await _write_page(opened, page, report)
                advance(len(page))
                page, size = [], 0
            page.append(item)
            size += len(item.value)
        if page:
            await _write_page(opened, page, report)
            advance(len(page))
    return sum(report.applied.values())


async def _write_page(opened: dict[str, KeyValueStore], page: list[Entry], report: ImportReport) -> None:
    kvs = opened[page[0].store]
    puts: list[tuple[KeyValueStore, RecordWrite]] = [
        (kvs, kvs.prepare_put(e.key, e.value, e.content_type)) for e in page
    ]
    where = f"lines {page[0].line}-{page[-1].line}" if len(page) > 1 else f"line {page[0].line}"
    try:
        outcomes: Sequence[WriteOutcome | StorageError | bool] = await KeyValueStore.put_together(puts)
    except Exception as exc:
        # The batch failed as a whole; a store may still have applied part of it
        # (one file per record): read the page back to say which records it holds.
        outcomes = await _read_back(kvs, page, exc, where, report)
    failed = [(e, o) for e, o in zip(page, outcomes, strict=True) if not _landed(o)]
    if failed:
        entry, outcome = failed[0]
        landed = [e.line for e, o in zip(page, outcomes, strict=True) if _landed(o)]
        not_written = _ranges([e.line for e, _ in failed])
        account = (
            f"of {where}, lines {_ranges(landed)} were written and {not_written} were not"
            if landed
            else f"none of {where} was written"
        )
        raise CommandError(
            f"line {entry.line}, key {entry.key!r} in store {kvs.label!r}: {_one_line(outcome)}; "
            f"{account}, nor any line after them; {report.applied_text()}. "
            "Importing the file again is safe: each record replaces its key"
        )
    report.applied[kvs.label] += len(page)
    report.last_line = page[-1].line


async def _read_back(
    kvs: KeyValueStore, page: list[Entry], error: Exception, where: str, report: ImportReport
) -> list[StorageError | bool]:
    """After a failed batch: for each entry, whether the store now holds it (else the batch's error)."""
    failure = StorageError(_one_line(error))
    try:
        found = await KeyValueStore.get_together([(kvs, e.key, False) for e in page])
    except Exception as exc:
        raise CommandError(
            f"writing the records of store {kvs.label!r} on {where} failed ({_one_line(error)}), and "
            f"reading them back failed too ({_one_line(exc)}): whether they were written is unknown; "
            f"none after them was; {report.applied_text()}. "
            "Importing the file again is safe: each record replaces its key"
        ) from error
    return [
        (isinstance(r, StoredRecord) and r.value == e.value and r.content_type == e.content_type) or failure
        for e, r in zip(page, found, strict=True)
    ]


def _ranges(numbers: list[int]) -> str:
    """`[4, 5, 6, 9]` as `4-6, 9`."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _landed(outcome: WriteOutcome | StorageError | bool) -> bool:
    return outcome is True or (isinstance(outcome, WriteOutcome) and outcome.applied)


def _one_line(what: object) -> str:
    if isinstance(what, WriteOutcome):
        return f"the store refused the write (version {what.version} is stored)"
    return " ".join(str(what).split()) or type(what).__name__
