"""Records set aside as unusable: found in `<store>.quarantine` under `<key>@<UTC time>`."""

from __future__ import annotations

from dataclasses import dataclass

from ..storage import QUARANTINE_SUFFIX, KeyValueStore, RecordInfo, StorageBackend
from ._output import warn
from ._runtime import CommandError


@dataclass(frozen=True, slots=True)
class SetAside:
    """A quarantined record, and where it came from."""

    kvs: KeyValueStore
    """The quarantine store it is in."""
    info: RecordInfo
    """The record, under its quarantine key."""
    store: str
    """The store it was set aside from."""
    key: str
    """The key it had there."""
    when: str
    """When it was set aside (UTC, ISO 8601), or "" when its key does not say."""


async def set_aside(storage: StorageBackend, store: str | None) -> list[SetAside]:
    """Every quarantined record (only those from `store`, when given), oldest first per key."""
    found = []
    for info in await storage.list_stores():
        if info.name is None or not info.name.endswith(QUARANTINE_SUFFIX):
            continue
        original = info.name[: -len(QUARANTINE_SUFFIX)]
        if store is not None and original != store:
            continue
        kvs = KeyValueStore(info, storage)
        for record in await kvs.list_keys():
            key, at, when = record.key.rpartition("@")
            if not at:  # not put there by the library: shown whole
                key, when = record.key, ""
            found.append(SetAside(kvs, record, original, key, when))
    return sorted(found, key=lambda q: (q.store, q.key, q.when))


def pick(found: list[SetAside], key: str, store: str | None) -> SetAside:
    """The record under quarantine key `key`, else the newest set aside from original key `key`."""
    matches = [q for q in found if q.info.key == key] or [q for q in found if q.key == key]
    if not matches:
        where = f" of store {store!r}" if store is not None else ""
        raise CommandError(f"nothing from key {key!r}{where} is in quarantine")
    if len(matches) > 1:
        warn(
            f"{len(matches)} records were set aside from key {key!r}; showing the newest, "
            f"{matches[-1].info.key!r} (give that full key to see another)"
        )
    return matches[-1]
