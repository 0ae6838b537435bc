"""Loading a state: a stored record (or nothing) becomes the slot's live value.

A record that does not load (not JSON, fails validation) raises
RecordCorruptError naming store, key and fields, and is left as it is, unless
the state asked to quarantine it: then it is copied aside and the state starts
from its default.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .._errors import RecordCorruptError
from ..storage import StoredRecord
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
    data = record.value if record.content_type == slot.content_type else migrate(
        record.value,
        record.content_type,
        code_version=slot.schema_version,
        migrations=slot.migrations,
        store=kvs.label,
        key=slot.key,
    )
    value, dropped = _validate(slot, data)
    # A migrated record, or one with dropped fields, is written back at the next persist.
    synced = data is record.value and not dropped
    slot.take(value, synced=synced)
    slot.version = record.version
    slot.stored = fingerprint(record.value) if synced else None


async def start_over(
    slot: StateSlot, record: StoredRecord | None, error: RecordCorruptError, default: Callable[[], Any]
) -> None:
    """A record that does not load: quarantine it and start from the default, or raise.

    `record` is None when the store itself could not parse it (a damaged file).
    """
    if slot.on_bad_record != "quarantine" or (record is None and error.raw is None):
        raise error
    if record is None:
        assert error.raw is not None
        record = StoredRecord(slot.key, error.raw, "application/octet-stream", 0, datetime.now(UTC))
    await _quarantine(slot, record, error)
    slot.lost = False
    slot.in_doubt = None
    slot.take(default(), synced=False)  # the default replaces the bad record on the next persist
    slot.version, slot.stored = record.version, None


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


async def _quarantine(slot: StateSlot, record: StoredRecord, error: Exception) -> None:
    assert slot.kvs is not None
    quarantine = await slot.kvs.open_quarantine()
    stamp = datetime.now(UTC).isoformat(timespec="microseconds")
    await quarantine.put_record(f"{slot.key}@{stamp}", record.value, record.content_type)
    slot.log.warning(
        "%s; the record was copied to store %r, key %r, and the state starts from its default",
        error,
        quarantine.label,
        f"{slot.key}@{stamp}",
        extra=slot.log_fields,
    )
