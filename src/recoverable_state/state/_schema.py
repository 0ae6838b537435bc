"""Schema evolution: a stored record's schema version, and migrating it to the code's."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from .._errors import RecordCorruptError, SchemaVersionError
from ..storage import JSON_CONTENT_TYPE, SCHEMA_VERSION_PARAM

Migration = Callable[[Any], Any]
"""Turns the stored JSON (parsed) of schema version k into that of version k + 1."""


def model_schema_version(model: Any) -> int | None:
    """The schema version a state type declares (`schema_version: ClassVar[int] = 3`), if any."""
    if not isinstance(model, type):  # dict[str, int], list[Any]: nothing to declare it on
        return None
    version = getattr(model, "schema_version", None)
    if version is None:
        return None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TypeError(f"{model.__name__}.schema_version must be an int of 1 or more, not {version!r}")
    return version


def content_type_for(version: int | None) -> str:
    """The content type a state's record is written with: JSON, plus its schema version."""
    if version is None:
        return JSON_CONTENT_TYPE
    return f"{JSON_CONTENT_TYPE}; {SCHEMA_VERSION_PARAM}={version}"


def stored_schema_version(content_type: str) -> int:
    """The schema version a record was written with (1 when it does not say)."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == SCHEMA_VERSION_PARAM:
            try:
                return int(value.strip())
            except ValueError:
                break
    return 1


def check_migrations(code_version: int | None, migrations: Mapping[int, Migration]) -> None:
    """Refuse migrations that could never run: steps at or past the code's version."""
    if not migrations:
        return
    if code_version is None:
        raise ValueError("migrations need a model that declares `schema_version: ClassVar[int]`")
    beyond = sorted(k for k in migrations if not 1 <= k < code_version)
    if beyond:
        raise ValueError(
            f"migrations {beyond} do not lead to schema version {code_version}: "
            f"key k migrates version k to k + 1, for k from 1 to {code_version - 1}"
        )


def migrate(
    data: bytes,
    content_type: str,
    *,
    code_version: int | None,
    migrations: Mapping[int, Migration],
    store: str,
    key: str,
) -> bytes:
    """Bring stored JSON bytes to the code's schema version; the bytes as they are if current.

    Raises SchemaVersionError for a record newer than the code (never downgraded)
    or a missing step, and RecordCorruptError when a migration fails.
    """
    stored = stored_schema_version(content_type)
    target = code_version or 1
    if stored > target:
        raise SchemaVersionError(
            f"the stored record has schema version {stored}, newer than the {target} this code "
            "knows; deploy the newer code (a record is never downgraded)",
            store=store,
            key=key,
        )
    if stored == target:
        return data
    missing = [k for k in range(stored, target) if k not in migrations]
    if missing:
        raise SchemaVersionError(
            f"the stored record has schema version {stored} and the code {target}, "
            f"but no migration is given from version(s) {missing}",
            store=store,
            key=key,
        )
    try:
        value = json.loads(data)
    except ValueError as exc:
        message = f"the stored record is not valid JSON ({exc})"
        raise RecordCorruptError(message, store=store, key=key) from exc
    for k in range(stored, target):
        try:
            value = migrations[k](value)
        except Exception as exc:
            raise RecordCorruptError(
                f"migrating the stored record from schema version {k} to {k + 1} failed: {exc!r}",
                store=store,
                key=key,
            ) from exc
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
