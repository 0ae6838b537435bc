"""`rekey`: records sealed with an older key (or stored in clear) sealed again with the ring's current key.

A key is rotated by putting a new key first in the ring: records move to it as
workers write them. `rekey` moves the rest at once, a page at a time: each
record is read (opened with whichever key of the ring sealed it) and written
back, fenced on the version it was read at, so a record a worker writes in
between is left to that worker and counted, never overwritten. Kept history is
what was written and is not rewritten: the snapshots still sealed with an older
key are counted, so the user knows when the old key can go.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._errors import StorageError
from ..storage import (
    KeyRing,
    KeyValueStore,
    RecordInfo,
    RecordWrite,
    StoredRecord,
    materialise,
    sealed_key_id,
)
from ._output import plural
from ._transfer import PAGE_RECORDS


@dataclass
class RekeyReport:
    """What a rekey found and did, per kind of record."""

    moved: Counter[str] = field(default_factory=Counter)
    """Records sealed again with the current key (or that would be, with --dry-run), by old key id."""
    current: int = 0
    """Records already sealed with the current key: left as they are."""
    written_meanwhile: list[str] = field(default_factory=list)
    """`store/key` of records a worker wrote between the read and the write: left to it."""
    failed: list[str] = field(default_factory=list)
    """`store/key: why` of records that could not be opened or written: left as they are."""
    old_snapshots: Counter[str] = field(default_factory=Counter)
    """Kept snapshots still sealed with a key other than the current one (or in clear), by key id."""

    def lines(self, ring: KeyRing, *, dry_run: bool) -> list[str]:
        """The report, a sentence per line; key ids and counts only, never a value."""
        verb = "would seal" if dry_run else "sealed"
        moved = sum(self.moved.values())
        froms = ", ".join(f"{n} from {_named(k)}" for k, n in sorted(self.moved.items()))
        out = [
            f"{verb} {plural(moved, 'record')} with key {ring.current!r}" + (f" ({froms})" if froms else "")
        ]
        out.append(f"{plural(self.current, 'record')} already sealed with key {ring.current!r}")
        if self.written_meanwhile:
            shown = ", ".join(self.written_meanwhile[:5]) + (
                ", ..." if len(self.written_meanwhile) > 5 else ""
            )
            out.append(
                f"{plural(len(self.written_meanwhile), 'record')} written by a worker meanwhile, "
                f"left to it: {shown}"
            )
        if self.old_snapshots:
            olds = ", ".join(f"{n} under {_named(k)}" for k, n in sorted(self.old_snapshots.items()))
            out.append(
                f"kept history still holds {plural(sum(self.old_snapshots.values()), 'snapshot')} not sealed "
                f"with key {ring.current!r} ({olds}): history is never rewritten, so keep those keys in the "
                "ring until newer snapshots have replaced them (see `history`)"
            )
        return out


def _named(key_id: str) -> str:
    return "clear records" if key_id == "" else f"key {key_id!r}"


async def rekey_stores(stores: Sequence[KeyValueStore], ring: KeyRing, *, dry_run: bool) -> RekeyReport:
    """Seal every record of `stores` not sealed with `ring.current` again with it (see the module)."""
    report = RekeyReport()
    for kvs in stores:
        infos = await kvs.list_keys()
        todo: list[RecordInfo] = []
        for info in infos:
            if sealed_key_id(info.content_type) == ring.current:
                report.current += 1
            else:
                todo.append(info)
        for start in range(0, len(todo), PAGE_RECORDS):
            await _rekey_page(kvs, todo[start : start + PAGE_RECORDS], report, dry_run=dry_run)
        for info in infos:
            for snapshot in await kvs.storage.read_history(kvs.id, info.key):  # as stored: still sealed
                key_id = sealed_key_id(snapshot.content_type) or ""
                if key_id != ring.current:
                    report.old_snapshots[key_id] += 1
    return report


async def _rekey_page(
    kvs: KeyValueStore, page: list[RecordInfo], report: RekeyReport, *, dry_run: bool
) -> None:
    records = await KeyValueStore.get_together([(kvs, info.key, False) for info in page])
    puts: list[tuple[KeyValueStore, RecordWrite]] = []
    olds: list[str] = []
    for info, record in zip(page, records, strict=True):
        if isinstance(record, StorageError):
            report.failed.append(f"{kvs.label}/{info.key}: {record}")
        elif isinstance(record, StoredRecord):  # None: deleted since the listing
            try:
                record = materialise(record, store=kvs.label)  # written back whole, under the new key
            except StorageError as error:
                report.failed.append(f"{kvs.label}/{info.key}: {error}")
                continue
            write = kvs.prepare_put(
                record.key, record.value, record.content_type, expected_version=record.version
            )
            puts.append((kvs, write))
            olds.append(sealed_key_id(info.content_type) or "")
    if dry_run:
        report.moved.update(olds)
        return
    outcomes = await KeyValueStore.put_together(puts) if puts else []
    for (_, write), old, outcome in zip(puts, olds, outcomes, strict=True):
        if isinstance(outcome, StorageError):
            report.failed.append(f"{kvs.label}/{write.key}: {outcome}")
        elif outcome.applied:
            report.moved[old] += 1
        else:
            report.written_meanwhile.append(f"{kvs.label}/{write.key}")
