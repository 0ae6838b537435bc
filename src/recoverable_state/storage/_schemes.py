"""The factories of this package's storage URL schemes (registered in pyproject.toml).

Each imports its backend module only when called, so that opening `sqlite://`
never imports redis-py, and a missing driver names the extra to install.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from .._errors import StorageError
from ._backend import StorageBackend
from ._redis_cluster_url import open_redis_cluster, wants_cluster
from ._url import redact_url, url_options

_REDIS_OPTIONS = frozenset(
    {"db", "username", "password", "client_name", "health_check_interval", "socket_keepalive"}
    | {"wait_replicas", "wait_timeout", "fsync"}  # the backend's own: _redis_durability.py
)
"""What a `redis://` URL's query may set; the timeouts and the pool are the backend's own
(`retry_timeout`, `pool_size`)."""

_REDISS_OPTIONS = _REDIS_OPTIONS | {
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_check_hostname",
}

_POSTGRES_OWN = frozenset({"connect_timeout"})
"""libpq parameters the backend sets itself, from `retry_timeout`."""

_POSTGRES_EXTRA = frozenset({"synchronous_commit"})
"""The backend's own query parameters (set per transaction; libpq never sees them)."""


def open_memory(url: str, **options: Any) -> StorageBackend:
    """`memory://`: records in this process only."""
    from ._memory import MemoryBackend

    url_options(url, ())
    return MemoryBackend()


def open_sqlite(url: str, **options: Any) -> StorageBackend:
    """`sqlite:///relative/path` or `sqlite:////absolute/path` (a `?` in the path is written `%3F`)."""
    from ._sqlite import SQLiteBackend

    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not url.lower().startswith("sqlite:///") or not path:
        raise StorageError(f"storage URL {url!r}: write sqlite:///relative/path or sqlite:////abs/path")
    url_options(url, ())
    return SQLiteBackend(unquote(path))


def open_file(url: str, **options: Any) -> StorageBackend:
    """`file:///absolute/dir` or `file://./relative/dir`."""
    from ._filesystem import FileSystemBackend

    parts = urlsplit(url)
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise StorageError(f"storage URL {url!r}: write file:///absolute/dir")
    url_options(url, ())
    return FileSystemBackend(path)


def open_redis(url: str, **options: Any) -> StorageBackend:
    """`redis://[user:password@]host:port/db` or `rediss://` (TLS); `?cluster=true`: a Redis Cluster."""
    if wants_cluster(url):
        return open_redis_cluster(url, **options)
    try:
        from ._redis import RedisBackend
    except ImportError as exc:
        raise StorageError(
            f"storage URL {redact_url(url)!r} needs redis-py: pip install 'recoverable-state[redis]'"
        ) from exc
    url_options(url, _REDISS_OPTIONS if url.lower().startswith("rediss:") else _REDIS_OPTIONS)
    return RedisBackend(url, **options)


def open_postgres(url: str, **options: Any) -> StorageBackend:
    """`postgresql://user[:password]@host:port/db`, with any libpq parameter in the query."""
    try:
        from psycopg import pq

        from ._postgres import PostgresBackend
    except ImportError as exc:
        raise StorageError(
            f"storage URL {redact_url(url)!r} needs psycopg: pip install 'recoverable-state[postgres]'"
        ) from exc
    libpq = {option.keyword.decode() for option in pq.Conninfo.get_defaults()}
    url_options(url, (libpq - _POSTGRES_OWN) | _POSTGRES_EXTRA)
    return PostgresBackend(url, **options)
