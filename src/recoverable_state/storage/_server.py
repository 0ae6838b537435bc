"""What the Redis and PostgreSQL backends share: a redacted URL, store labels, bounded retries."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio

from .._errors import StorageError, StorageUnavailableError
from ._backend import StorageBackend

T = TypeVar("T")


def redact_url(url: str) -> str:
    """The URL without any password (in the user part or the query), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return parts._replace(netloc=netloc, query=query).geturl()


class ServerBackend(StorageBackend):
    """A backend on a server reached over the network, which may be down for a while."""

    server_name: str = "server"
    """How messages name the kind of server ("Redis server", "PostgreSQL server")."""

    def __init__(self, url: str, *, pool_size: int = 4, retry_timeout: float = 10.0) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._dsn = url
        self.url = redact_url(url)
        self.pool_size = pool_size
        """Connections kept at most (worker threads use one each)."""
        self.retry_timeout = retry_timeout
        """Seconds an unreachable server is retried before StorageUnavailableError."""
        self._labels: dict[str, str] = {}

    def _label(self, store_ids: Sequence[str] | set[str]) -> str:
        """How messages name these stores: by name where known, at most three of them."""
        labels = sorted({self._labels.get(s, s) for s in store_ids})
        return ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")

    async def _retrying(
        self,
        store: str | None,
        attempt: Callable[[], Awaitable[T]],
        *,
        unreachable: tuple[type[BaseException], ...],
        failed: tuple[type[BaseException], ...],
    ) -> T:
        """Await `attempt()`, retrying `unreachable` errors with backoff within the budget.

        The backoff starts at 50 ms and doubles to 1 s; the last attempt comes at the
        deadline. `failed` errors (the server answered, with an error) are not retried.
        """
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        while True:
            try:
                return await attempt()
            except unreachable as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StorageUnavailableError(
                        f"{self.server_name} {self.url} unreachable for {self.retry_timeout:g} s "
                        f"({type(exc).__name__}: {exc})",
                        store=store,
                    ) from exc
            except failed as exc:
                raise StorageError(f"{self.server_name} {self.url} failed: {exc}", store=store) from exc
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)
