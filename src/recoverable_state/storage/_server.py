"""What the Redis and PostgreSQL backends share: a redacted URL, store labels, bounded retries.

Budget: one `retry_timeout` (seconds, `RECOVERABLE_STATE_STORAGE_RETRY_TIMEOUT`,
the CLI's `--timeout`) bounds each operation on the server from start to end:
waiting for a pooled connection, connecting, every command's reply, locks held
by other connections, and the retries in between. Each attempt runs in a worker
thread whose driver timeouts are set from that budget, so the thread ends on
its own; should it still be waiting `_GRACE` seconds past the budget, the
caller stops waiting for it (the backend's `interrupt` closes its connection
so that the thread ends too) and gets StorageUnavailableError at once. An
outside cancellation interrupts the attempt in the same way.

Failures are told apart: a server that refused or dropped the connection is
"unreachable"; one that took the connection but never replied "did not
answer"; one that was busy (a lock held elsewhere) "did not finish". All three
are retried within the budget, then raise StorageUnavailableError. Rejected
credentials raise StorageAuthenticationError at once, and any other error the
server answered with raises StorageError at once.
"""

from __future__ import annotations

import enum
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import anyio

from .._errors import StorageAuthenticationError, StorageError, StorageUnavailableError
from ._backend import StorageBackend
from ._url import redact_url, url_passwords

T = TypeVar("T")

_GRACE = 0.25
"""Seconds past the budget an attempt may take to end on its own before the caller stops waiting."""

_MIN_WAIT = 0.1
"""The shortest driver timeout set (a zero timeout would mean "do not block" or "no limit")."""


class Failure(enum.Enum):
    """What kind of failure an attempt met, which decides retrying and the message."""

    UNREACHABLE = "unreachable"
    """The connection was refused, reset or lost: retried."""
    SILENT = "silent"
    """The server took the connection but did not reply in time: retried."""
    BUSY = "busy"
    """The server answered too late: a lock held elsewhere, a statement timeout: retried."""
    AUTHENTICATION = "authentication"
    """The server refused the credentials: never retried."""
    FAILED = "failed"
    """The server answered with any other error: never retried."""


_RETRIED = (Failure.UNREACHABLE, Failure.SILENT, Failure.BUSY)


class ServerBackend(StorageBackend):
    """A backend on a server reached over the network, which may be down for a while.

    Subclass it (with `TransactionalBackend` too, where the server has transactions)
    to get one retry budget, told-apart failures and passwords kept out of every
    message. Its protected surface, stable for server backends:

    - `_classify(exc)` (abstract): what kind of `Failure` a driver exception is,
      or None for one that is not the server's (raised unchanged).
    - `_describe(exc)`: the detail a message quotes for `exc` (override to say
      more, such as which lock timed out).
    - `_retrying(store, attempt, interrupt=)`: await `attempt(deadline)`, retried
      with backoff within `retry_timeout`, then raise the library error. Every
      call of a server backend goes through it.
    - `_dsn` (the URL as given, password included: for the driver only),
      `_label(store_ids)` and `_labels` (store names for messages), `_scrub(text)`.

    A subclass sets `server_name` and calls `super().__init__(url, pool_size=,
    retry_timeout=)`; `url` is then the URL without its password.
    """

    server_name: str = "server"
    """How messages name the kind of server ("Redis server", "PostgreSQL server")."""

    def __init__(self, url: str, *, pool_size: int = 4, retry_timeout: float = 10.0) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if not retry_timeout >= 0:
            raise ValueError(f"retry_timeout must be a number of seconds >= 0, not {retry_timeout!r}")
        self._dsn = url
        self._secrets = url_passwords(url)
        self.url = redact_url(url)
        self.pool_size = pool_size
        """Connections kept at most (worker threads use one each)."""
        self.retry_timeout = float(retry_timeout)
        """Seconds one operation may wait on the server in all (connecting, replies, locks
        and retries) before StorageUnavailableError."""
        self._labels: dict[str, str] = {}

    @property
    def _wait(self) -> float:
        """The retry budget as a driver timeout (never zero)."""
        return max(self.retry_timeout, _MIN_WAIT)

    def _label(self, store_ids: Collection[str]) -> str:
        """How messages name these stores: by name where known, at most three of them."""
        labels = sorted({self._labels.get(s, s) for s in store_ids})
        return ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")

    @abstractmethod
    def _classify(self, exc: BaseException) -> Failure | None:
        """What kind of failure `exc` is; None: not the server's (raised unchanged)."""

    def _describe(self, exc: BaseException) -> str:
        """`exc` for a message: its type and text."""
        return f"{type(exc).__name__}: {exc}"

    def _scrub(self, text: str) -> str:
        """`text` with the URL's password replaced, should a driver ever echo it."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, kind: Failure, store: str | None, detail: str | None) -> StorageError:
        """The library error for a failure of this kind (retried ones: after the budget)."""
        budget = f"{self.retry_timeout:g} s"
        what = {
            Failure.UNREACHABLE: f"unreachable for {budget}",
            Failure.SILENT: f"did not answer within {budget}",
            Failure.BUSY: f"did not finish within {budget}",
            Failure.AUTHENTICATION: "refused the credentials: authentication failed",
            Failure.FAILED: "failed",
        }[kind]
        message = self._scrub(f"{self.server_name} {self.url} {what}" + (f" ({detail})" if detail else ""))
        if kind is Failure.AUTHENTICATION:
            return StorageAuthenticationError(message, store=store)
        if kind is Failure.FAILED:
            return StorageError(message, store=store)
        return StorageUnavailableError(message, store=store)

    async def _retrying(
        self,
        store: str | None,
        attempt: Callable[[float], Awaitable[T]],
        *,
        interrupt: Callable[[], None] | None = None,
    ) -> T:
        """Await `attempt(deadline)`, retrying server failures with backoff within the budget.

        `attempt` must run its worker thread with `abandon_on_cancel=True` and set its
        driver timeouts to end by `deadline` (a `time.monotonic()` value). Past the
        deadline plus `_GRACE`, or when cancelled from outside, the attempt is
        abandoned and `interrupt()` (if given) makes its thread end. The backoff
        starts at 50 ms and doubles to 1 s; the last attempt comes at the deadline.
        """
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        while True:
            with anyio.move_on_after(max(deadline - time.monotonic(), 0) + _GRACE) as scope:
                try:
                    return await attempt(deadline)
                except anyio.get_cancelled_exc_class():
                    if interrupt is not None:
                        interrupt()
                    raise
                except Exception as exc:
                    kind = self._classify(exc)
                    if kind is None:
                        raise
                    if kind not in _RETRIED or deadline - time.monotonic() <= 0:
                        raise self._error(kind, store, self._describe(exc)) from exc
            if scope.cancelled_caught:
                raise self._error(Failure.SILENT, store, "no reply, the attempt was abandoned")
            await anyio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, 1.0)
