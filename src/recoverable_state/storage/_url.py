"""Pick and build a storage backend from a storage URL."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from .._errors import StorageError
from ._backend import StorageBackend
from ._server import redact_url


def open_backend(
    url: str, *, pool_size: int | None = None, retry_timeout: float | None = None
) -> StorageBackend:
    """Build the backend a storage URL names (no I/O happens until first use).

    `sqlite:///relative/path.sqlite3`, `sqlite:////absolute/path.sqlite3`,
    `file:///absolute/dir` (or `file://./relative/dir`), `memory://`,
    `redis://host:port/db`, `postgresql://user@host:port/db`.

    `pool_size` (connections) and `retry_timeout` apply to Redis and PostgreSQL;
    None keeps the backend's default. `retry_timeout` is the budget, in seconds,
    of one operation on the server in all: connecting, every reply, locks held
    by other connections, and the retries in between (the CLI's `--timeout`).
    """
    server_options: dict[str, float] = {}
    if pool_size is not None:
        server_options["pool_size"] = pool_size
    if retry_timeout is not None:
        server_options["retry_timeout"] = retry_timeout
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "memory":
        from ._memory import MemoryBackend

        return MemoryBackend()
    if scheme == "sqlite":
        from ._sqlite import SQLiteBackend

        if not url.lower().startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise StorageError(f"storage URL {url!r}: write sqlite:///relative/path or sqlite:////abs/path")
        return SQLiteBackend(unquote(url[len("sqlite:///") :]))
    if scheme == "file":
        from ._filesystem import FileSystemBackend

        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise StorageError(f"storage URL {url!r}: write file:///absolute/dir")
        return FileSystemBackend(path)
    if scheme in ("redis", "rediss"):
        try:
            from ._redis import RedisBackend
        except ImportError as exc:
            raise StorageError(
                f"storage URL {redact_url(url)!r} needs redis-py: pip install 'recoverable-state[redis]'"
            ) from exc
        return RedisBackend(url, **server_options)  # type: ignore[arg-type]
    if scheme in ("postgresql", "postgres"):
        try:
            from ._postgres import PostgresBackend
        except ImportError as exc:
            raise StorageError(
                f"storage URL {redact_url(url)!r} needs psycopg: pip install 'recoverable-state[postgres]'"
            ) from exc
        return PostgresBackend(url, **server_options)  # type: ignore[arg-type]
    raise StorageError(
        f"storage URL {redact_url(url)!r} has an unknown scheme; "
        "use sqlite, file, memory, redis or postgresql"
    )
