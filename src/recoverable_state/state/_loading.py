"""Loading a state: a stored record (or nothing) becomes the slot's live value.

A record that does not load (damaged, not JSON, fails validation) raises
RecordCorruptError naming store, key and fields, and is left as it is, unless
the state asked otherwise: "quarantine" copies it aside and starts from the
default; "previous" starts from the newest good snapshot of its history (and
copies the bad record aside). Either way the next persist replaces the bad record.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .._errors import RecordCorruptError, StorageError
from ..storage import CHAIN_CONTENT_TYPE, StoredRecord, chain_sizes, materialise
from ._codec import describe_validation_error
from ._schema import migrate
from ._slot import StateSlot, fingerprint


def start_from(slot: StateSlot, record: StoredRecord | None, default: Callable[[], Any]) -> None:
    """Take the loaded record (None: nothing stored) as the live value; see `load_slots`.

    Raises RecordCorruptError for a record that does not load (see `start_over`).
    """
    kvs = slot.kvs
    assert kvs is not None
    slot.lost = False
    slot.in_doubt = None
    if record is None:
        slot.take(default(), synced=False)
        slot.version, slot.stored = 0, None
        return
    chain = _shape(record)
    if record.content_type == CHAIN_CONTENT_TYPE:  # a snapshot and its deltas: one value, validated once
        record = materialise(record, store=kvs.label)
    data = (
        record.value
        if record.content_type == slot.content_type
        else migrate(
            record.value,
            record.content_type,
            code_version=slot.schema_version,
            migrations=slot.migrations,
            store=kvs.label,
            key=slot.key,
        )
    )
    value, dropped = _validate(slot, data)
    # A migrated record, or one with dropped fields, is written back at the next persist.
    synced = data is record.value and not dropped
    slot.take(value, synced=synced, fresh=True)
    slot.version = record.version
    slot.stored = fingerprint(record.value) if synced and not chain[2] else None
    slot.chain_bytes, slot.delta_bytes, slot.chain_deltas = chain
    slot.appendable = synced  # an append follows what is stored as it loaded
    slot.watch_loaded()


def _shape(record: StoredRecord) -> tuple[int, int, int]:
    """A record's (snapshot bytes, delta bytes, deltas)."""
    if record.content_type != CHAIN_CONTENT_TYPE:
        return (len(record.value), 0, 0)
    try:
        sizes = chain_sizes(record.value)
    except ValueError:
        return (len(record.value), 0, 0)  # `materialise` says what is wrong with it
    return (sizes[0], sum(sizes[1:]), len(sizes) - 1)


async def start_over(
    slot: StateSlot, record: StoredRecord | None, error: RecordCorruptError, default: Callable[[], Any]
) -> None:
    """A record that does not load: start from its history, or quarantine it and its default, or raise.

    `record` is None when the store itself could not take it apart (a damaged file,
    a checksum that does not match); `error.raw` then holds its bytes, if known.
    """
    if slot.on_bad_record == "previous":
        await _start_from_history(slot, record, error)
        return
    if slot.on_bad_record != "quarantine" or (record is None and error.raw is None):
        raise error
    record = _bad_record(slot, record, error)
    await _quarantine(slot, record, error)
    slot.lost = False
    slot.in_doubt = None
    slot.take(default(), synced=False)  # the default replaces the bad record on the next persist
    slot.version, slot.stored = record.version, None


def _bad_record(slot: StateSlot, record: StoredRecord | None, error: RecordCorruptError) -> StoredRecord:
    """The bad record as stored (rebuilt from the error when the store could not take it apart)."""
    if record is not None:
        return record
    assert error.raw is not None
    return StoredRecord(slot.key, error.raw, "application/octet-stream", error.version, datetime.now(UTC))


async def _start_from_history(
    slot: StateSlot, record: StoredRecord | None, error: RecordCorruptError
) -> None:
    """Take the newest snapshot of the key's history that loads; RecordCorruptError when none does."""
    kvs = slot.kvs
    assert kvs is not None
    skipped = [record.version if record is not None else error.version]
    for snapshot in await kvs.get_history(slot.key, errors="return"):
        if isinstance(snapshot, RecordCorruptError):
            skipped.append(snapshot.version)
            continue
        if isinstance(snapshot, StorageError):  # sealed with a key the ring lacks: not a bad record
            raise snapshot
        try:
            start_from(slot, snapshot, lambda: None)
        except RecordCorruptError:
            skipped.append(snapshot.version)
            continue
        # The record stays at its own version: the next persist replaces it, fenced as usual.
        slot.version, slot.stored, slot.synced, slot.appendable = skipped[0], None, False, False
        slot.log.warning(
            "store %r, key %r: the stored record does not load (%s); starting from the snapshot of version "
            "%d in its history (versions skipped: %s); the next persist writes a good record",
            slot.label,
            slot.key,
            error,
            snapshot.version,
            ", ".join(str(v) for v in skipped),
            extra=slot.log_fields,
        )
        if record is not None or error.raw is not None:
            await _quarantine(slot, _bad_record(slot, record, error), error, starts_from="its history")
        return
    raise RecordCorruptError(
        f"{error}; and no snapshot of its history loads either (versions {', '.join(map(str, skipped))})",
        store=slot.label,
        key=slot.key,
    ) from error


def _validate(slot: StateSlot, data: bytes) -> tuple[Any, bool]:
    try:
        value, dropped = slot.codec.load(data)
    except ValidationError as exc:
        problem = describe_validation_error(exc)
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            message = f"the stored record is not valid JSON ({problem})"
        else:
            message = f"the stored record does not validate as {slot.codec.name}: {problem}"
        raise RecordCorruptError(message, store=slot.label, key=slot.key) from exc
    if dropped:
        slot.log.warning(
            "store %r, key %r: the stored record has fields %s that %s no longer has; they are "
            "dropped at the next persist (keep them with a migration: see schema_version)",
            slot.label,
            slot.key,
            ", ".join(repr(d) for d in dropped),
            slot.codec.name,
            extra=slot.log_fields,
        )
    return value, bool(dropped)


async def _quarantine(
    slot: StateSlot, record: StoredRecord, error: Exception, *, starts_from: str = "its default"
) -> None:
    assert slot.kvs is not None
    quarantine = await slot.kvs.open_quarantine()
    stamp = datetime.now(UTC).isoformat(timespec="microseconds")
    await quarantine.put_record(f"{slot.key}@{stamp}", record.value, record.content_type)
    slot.log.warning(
        "%s; the record was copied to store %r, key %r, and the state starts from %s",
        error,
        quarantine.label,
        f"{slot.key}@{stamp}",
        starts_from,
        extra=slot.log_fields,
    )
