"""Storage URL schemes, registered as entry points: `open_backend(url)` finds the backend a URL names.

A package adds a scheme (`s3://`) by declaring a factory in the entry-point
group `recoverable_state.backends`, named for the scheme::

    [project.entry-points."recoverable_state.backends"]
    s3 = "my_package.backend:open_s3"

A factory is called as `factory(url, **options)` and returns a StorageBackend
without doing any I/O; `options` are the arguments of `open_backend` that were
given (`pool_size`, `retry_timeout`), which a factory may ignore. It checks the
URL's query with `url_options`. This package registers its own schemes the same
way; should another distribution register one of them too, this package's wins.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeAlias

from .._errors import StorageError
from ._backend import StorageBackend
from ._keyring import KeyRing
from ._url import redact_url

ENTRY_POINT_GROUP = "recoverable_state.backends"
"""The entry-point group a package registers a storage URL scheme in (its name: the scheme)."""

BackendFactory: TypeAlias = Callable[..., StorageBackend]
"""`factory(url, **options) -> StorageBackend`: builds the backend a storage URL names, without I/O."""

_OWN = {
    "memory": "recoverable_state.storage._schemes:open_memory",
    "sqlite": "recoverable_state.storage._schemes:open_sqlite",
    "file": "recoverable_state.storage._schemes:open_file",
    "redis": "recoverable_state.storage._schemes:open_redis",
    "rediss": "recoverable_state.storage._schemes:open_redis",
    "redis+cluster": "recoverable_state.storage._redis_cluster_url:open_redis_cluster",
    "postgresql": "recoverable_state.storage._schemes:open_postgres",
    "postgres": "recoverable_state.storage._schemes:open_postgres",
}
"""This package's schemes, as pyproject.toml registers them: known also when the package runs
from a source tree whose metadata is not installed."""

_log = logging.getLogger("recoverable_state.storage")


@functools.cache
def _registry() -> dict[str, EntryPoint]:
    """Every registered scheme (lower case) and its entry point, read once per process."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        scheme = point.name.lower()
        if scheme in _OWN and point.value != _OWN[scheme]:
            dist = point.dist.name if point.dist is not None else "another distribution"
            _log.warning(
                "storage URL scheme %r registered by %s is ignored: %s is this package's",
                scheme,
                dist,
                scheme,
            )
            continue
        found.setdefault(scheme, point)
    for scheme, value in _OWN.items():
        found.setdefault(scheme, EntryPoint(scheme, value, ENTRY_POINT_GROUP))
    return found


def registered_schemes() -> list[str]:
    """The storage URL schemes `open_backend` knows, sorted: this package's and every installed plug-in's."""
    return sorted(_registry())


@functools.cache
def _factory(scheme: str) -> BackendFactory:
    """The factory of a registered scheme, imported on first use (KeyError when none is registered)."""
    point = _registry()[scheme]
    try:
        factory: BackendFactory = point.load()
    except Exception as exc:  # a plug-in that cannot be imported: say which
        dist = point.dist.name if point.dist is not None else "its distribution"
        raise StorageError(
            f"storage URL scheme {scheme!r} is registered by {dist} ({point.value}), "
            f"which cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    return factory


def open_backend(
    url: str,
    *,
    pool_size: int | None = None,
    retry_timeout: float | None = None,
    encryption_keys: str | KeyRing | None = None,
) -> StorageBackend:
    """Build the backend a storage URL names (no I/O happens until first use).

    `sqlite:///relative/path.sqlite3`, `sqlite:////absolute/path.sqlite3`,
    `file:///absolute/dir` (or `file://./relative/dir`), `memory://`,
    `redis://host:port/db`, `postgresql://user@host:port/db`, and any scheme an
    installed package registers (see `registered_schemes`).

    `pool_size` (connections) and `retry_timeout` apply to Redis and PostgreSQL;
    None keeps the backend's default. `retry_timeout` is the budget, in seconds,
    of one operation on the server in all: connecting, every reply, locks held
    by other connections, and the retries in between (the CLI's `--timeout`).

    `encryption_keys` (a `KeyRing`, or its text `id:base64key,...`) seals every record
    written through this backend and opens those it reads (see `KeyRing`).

    Raises StorageError for an unknown scheme (naming the registered ones), a
    query parameter the backend does not accept (naming those it does), or a
    missing driver (naming the extra to install).
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    try:
        factory = _factory(scheme)
    except KeyError:
        raise StorageError(
            f"storage URL {redact_url(url)!r} has an unknown scheme {scheme!r}; the registered ones are "
            f"{', '.join(registered_schemes())} (a package adds one in the entry-point group "
            f"{ENTRY_POINT_GROUP!r})"
        ) from None
    options: dict[str, Any] = {}
    if pool_size is not None:
        options["pool_size"] = pool_size
    if retry_timeout is not None:
        options["retry_timeout"] = retry_timeout
    ring = KeyRing.parse(encryption_keys) if isinstance(encryption_keys, str) else encryption_keys
    backend = factory(url, **options)
    if ring is not None:
        backend.key_ring = ring
    return backend
