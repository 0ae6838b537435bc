"""Key rings: the AES-GCM keys that seal records, by id (the first seals, every one opens).

`_envelope.py` decides what a stored record looks like; this module holds the
keys and does the sealing and opening of one value. The cipher is
`cryptography`'s AESGCM, imported when the first ring is built.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from typing import Any

from .._errors import RecordDecryptionError, StorageError
from .._forks import watch_forks

SEALED_CONTENT_TYPE = "application/vnd.recoverable-state.sealed"
"""The content type of an encrypted record (its own content type is sealed inside)."""

KEY_ID_PARAM = "key-id"

_MAGIC = b"RS1\x00"
_NONCE = 12
_AAD = b"recoverable-state sealed record 1"
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class KeyRing:
    """Encryption keys by id: the first seals new records, every one opens the records sealed with it.

    Written `id:base64key,id:base64key,...` (RECOVERABLE_STATE_ENCRYPTION_KEYS); each
    key is 16, 24 or 32 bytes (AES-128, -192, -256). Its repr names the ids only,
    never key material. Needs `cryptography` (`pip install 'recoverable-state[crypto]'`).
    """

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:
            raise StorageError(
                "encryption keys are set, but `cryptography` is missing: "
                "pip install 'recoverable-state[crypto]'"
            ) from exc
        if not keys:
            raise ValueError("a key ring holds at least one key")
        self._ciphers: dict[str, Any] = {}
        for key_id, key in keys:
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"encryption key id {key_id!r} is not valid: use 1 to 64 of A-Za-z0-9._-")
            if key_id in self._ciphers:
                raise ValueError(f"encryption key id {key_id!r} is given twice")
            if len(key) not in (16, 24, 32):
                raise ValueError(f"encryption key {key_id!r} must be 16, 24 or 32 bytes, not {len(key)}")
            self._ciphers[key_id] = AESGCM(key)
        self.current = keys[0][0]
        """The id of the key that seals new records."""
        self._sealer = self._ciphers[self.current]
        self._by_type: dict[str, Any] = {}  # a sealed content type -> the cipher of its key id
        self._sealed_type = f"{SEALED_CONTENT_TYPE}; {KEY_ID_PARAM}={self.current}"
        self._nonces: list[bytes] = []
        watch_forks(self)  # a forked child must not seal with the nonces its parent drew

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """A ring from `id:base64key,id:base64key,...`; a ValueError names the id that is wrong."""
        keys: list[tuple[str, bytes]] = []
        for number, part in enumerate((p.strip() for p in text.split(",")), 1):
            if not part:
                continue
            key_id, sep, encoded = part.partition(":")
            if not sep:  # what was written may be the key itself: never quoted back
                raise ValueError(f"entry {number} of the key ring has no id: write id:base64key,...")
            try:
                keys.append((key_id.strip(), base64.b64decode(encoded.strip(), validate=True)))
            except binascii.Error:
                raise ValueError(f"encryption key {key_id.strip()!r} is not valid base64") from None
        return cls(keys)

    @property
    def ids(self) -> list[str]:
        """The ids of the ring's keys, the current one first."""
        return list(self._ciphers)

    def __repr__(self) -> str:
        return f"<KeyRing {', '.join(self._ciphers)} (sealing with {self.current})>"

    def seal(self, value: bytes, content_type: str) -> tuple[bytes, str]:
        """`value` and `content_type`, sealed with the current key."""
        nonce = self._nonce()
        head = _heads.get(content_type) or _head(content_type)
        box = self._sealer.encrypt(nonce, head + value, _AAD)
        return _MAGIC + nonce + box, self._sealed_type

    def _nonce(self) -> bytes:
        """A fresh random nonce, cut from a block of random bytes drawn 1,024 nonces at a time.

        A forked child drops the block it inherited (`after_fork_in_child`): two processes
        must never seal with the same nonce under one key.
        """
        if not self._nonces:
            block = os.urandom(_NONCE * _NONCE_BLOCK)
            self._nonces = [block[i : i + _NONCE] for i in range(0, len(block), _NONCE)]
        return self._nonces.pop()

    def after_fork_in_child(self) -> None:
        """Drop the nonces drawn in the parent: two processes never seal with one nonce."""
        self._nonces = []

    def open_quietly(self, value: bytes, sealed_type: str) -> tuple[bytes, str] | None:
        """`open` for the usual record, whose checksum was right: None where `open` would raise.

        The key id of a sealed content type is read once per type and kept.
        """
        cipher = self._by_type.get(sealed_type)
        if cipher is None:
            cipher = self._ciphers.get(sealed_key_id(sealed_type) or "")
            if cipher is None:
                return None
            if len(self._by_type) < 64:
                self._by_type[sealed_type] = cipher
        view = memoryview(value)
        start = len(_MAGIC)
        try:
            plain = cipher.decrypt(view[start : start + _NONCE], view[start + _NONCE :], _AAD)
        except Exception:  # InvalidTag: `open` tells why
            return None
        cut = plain.find(b"\n")
        return plain[cut + 1 :], plain[:cut].decode()

    def open(self, value: bytes, key_id: str, *, store: str, key: str) -> tuple[bytes, str]:
        """The value and content type a sealed record holds; RecordDecryptionError if it cannot be opened."""
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise RecordDecryptionError(
                f"the record is sealed with encryption key {key_id!r}, which is not in the key ring "
                f"({', '.join(self._ciphers)}); add that key to RECOVERABLE_STATE_ENCRYPTION_KEYS. "
                "The record is left as it is",
                store=store,
                key=key,
                key_id=key_id,
            )
        try:
            head = len(_MAGIC)
            plain = cipher.decrypt(value[head : head + _NONCE], value[head + _NONCE :], _AAD)
        except Exception:  # cryptography's InvalidTag: a wrong key under that id, or tampering
            raise RecordDecryptionError(
                f"the record does not open with encryption key {key_id!r} (a different key under that "
                "id, or the ciphertext was changed); the record is left as it is",
                store=store,
                key=key,
                key_id=key_id,
            ) from None
        content_type, _, inner = plain.partition(b"\n")
        return inner, content_type.decode()


_NONCE_BLOCK = 1024
_heads: dict[str, bytes] = {}


def _head(content_type: str) -> bytes:
    """What a sealed value starts with: its content type and a newline (kept for a few types)."""
    head = content_type.encode() + b"\n"
    if len(_heads) < 64:
        _heads[content_type] = head
    return head


def sealed_key_id(content_type: str) -> str | None:
    """The key id a stored record is sealed with, or None when it is not sealed."""
    if not content_type.startswith(SEALED_CONTENT_TYPE):
        return None
    return content_type.partition(f"{KEY_ID_PARAM}=")[2].split(";", 1)[0].strip() or None
