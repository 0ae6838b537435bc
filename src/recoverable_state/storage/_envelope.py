"""How a record's value is kept in a store: a checksum of what was written, and encryption at rest.

Every record written carries a CRC-32 of its stored bytes as a content-type
parameter (`rs-crc32=...`), so a damaged record (a flipped digit on a failing
disk, a bad restore) is found before anything parses it. A record written
before checksums existed has none and loads unchanged.

With a key ring, a record's value and its content type are sealed with
AES-GCM under the ring's first key: the stored value is a short header, a
random nonce and the ciphertext, and its content type says only that it is
sealed and by which key id (`key-id=...`). Keys and store names stay readable;
everything in the value does not. Any key of the ring opens a record sealed
with it, so a key is rotated by putting a new one first; records move to it as
they are written (or with `recoverable-state rekey`). The ring itself, and the
sealing of one value, are `_keyring.py`'s.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

from .._errors import RecordCorruptError, RecordDecryptionError, StorageError
from ._backend import StoredRecord
from ._chain import CHAIN_CONTENT_TYPE, pack_chain, unpack_chain
from ._keyring import SEALED_CONTENT_TYPE, KeyRing, sealed_key_id

CHECKSUM_PARAM = "rs-crc32"
"""The content-type parameter that carries a record's checksum."""

_SUFFIX = f"; {CHECKSUM_PARAM}="
_HEX8 = "%08x"
"""A checksum as stored: %-formatting is the fastest spelling (this runs once per record)."""


def seal(value: bytes, content_type: str, ring: KeyRing | None) -> tuple[bytes, str]:
    """What a backend stores for a record: sealed with `ring` when one is given, and checksummed."""
    if ring is not None:
        value, content_type = ring.seal(value, content_type)
    return value, content_type + _SUFFIX + _HEX8 % zlib.crc32(value)


def unseal(record: StoredRecord, ring: KeyRing | None, *, store: str) -> StoredRecord:
    """The record as it was written: checksum checked, opened when sealed.

    Raises RecordCorruptError (its `raw` the stored bytes) when the checksum does
    not match, and RecordDecryptionError when a sealed record cannot be opened.
    """
    key, value, content_type, version, updated_at = record
    if content_type == CHAIN_CONTENT_TYPE:
        return _unseal_chain(record, ring, store)
    head, sep, checksum = content_type.rpartition(_SUFFIX)
    if not sep:
        return record  # written before checksums: nothing to check
    if _HEX8 % zlib.crc32(value) != checksum:
        raise RecordCorruptError(
            "the stored record does not match its checksum (it was damaged after it was written)",
            store=store,
            key=key,
            raw=value,
            version=version,
        )
    if head.startswith(SEALED_CONTENT_TYPE):
        key_id = sealed_key_id(head) or ""
        if ring is None:
            raise RecordDecryptionError(
                f"the record is sealed with encryption key {key_id!r}, and no key ring is set "
                "(RECOVERABLE_STATE_ENCRYPTION_KEYS); the record is left as it is",
                store=store,
                key=key,
                key_id=key_id,
            )
        value, head = ring.open(value, key_id, store=store, key=key)
    return StoredRecord(key, value, head, version, updated_at)


def _unseal_chain(record: StoredRecord, ring: KeyRing | None, store: str) -> StoredRecord:
    """A chain with each of its pieces unsealed: a damaged delta damages the record it belongs to."""
    try:
        pieces = unpack_chain(record.value)
    except ValueError as exc:
        raise RecordCorruptError(
            str(exc), store=store, key=record.key, raw=record.value, version=record.version
        ) from None
    opened = []
    for n, (value, content_type) in enumerate(pieces):
        try:
            piece = unseal(record._replace(value=value, content_type=content_type), ring, store=store)
        except RecordCorruptError:
            what = "snapshot" if n == 0 else f"delta {n} of {len(pieces) - 1}"
            raise RecordCorruptError(
                f"the record's {what} does not match its checksum (it was damaged after it was written)",
                store=store,
                key=record.key,
                raw=record.value,
                version=record.version,
            ) from None
        opened.append((piece.value, piece.content_type))
    return record._replace(value=pack_chain(opened))


def without_checksum(content_type: str) -> str:
    """A stored content type without the checksum parameter (what a listing shows)."""
    head, sep, _ = content_type.rpartition(_SUFFIX)
    return head if sep else content_type


def unseal_many(
    records: Sequence[StoredRecord | StorageError | None],
    ring: KeyRing | None,
    store_of: Sequence[str],
    label: Callable[[str], str],
) -> list[StoredRecord | StorageError | None]:
    """`unseal` for a batch (`store_of[i]`: the store id of `records[i]`); an error in place of a record.

    The usual record (in clear, checksum right) takes a path of its own: a cold
    start of 100,000 states opens 100,000 records.
    """
    opened: list[StoredRecord | StorageError | None] = []
    crc32 = zlib.crc32
    for store_id, record in zip(store_of, records, strict=True):
        if type(record) is StoredRecord:
            key, value, content_type, version, updated_at = record
            head, sep, checksum = content_type.rpartition(_SUFFIX)
            inner = None
            if sep and _HEX8 % crc32(value) == checksum:
                if not head.startswith(SEALED_CONTENT_TYPE):
                    inner = value, head
                elif ring is not None:
                    inner = ring.open_quietly(value, head)
            if inner is not None:
                record = _new_record(StoredRecord, (key, inner[0], inner[1], version, updated_at))
            else:  # damaged, or sealed with a key the ring lacks: `unseal` says which
                try:
                    record = unseal(record, ring, store=label(store_id))
                except StorageError as error:
                    record = error
        opened.append(record)
    return opened


_new_record = tuple.__new__
"""Builds a StoredRecord from its fields: the NamedTuple's own constructor is Python code."""
