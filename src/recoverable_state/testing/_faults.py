"""A backend wrapper that injects storage faults, to test workers and stores.

Wrap any backend, tell it which faults the next batches meet, and check that
what every caller was told matches what the store holds::

    faulty = FaultInjectingBackend(open_backend("sqlite:///state.sqlite3"))
    faulty.fail_next(when="after")      # the next write batch is applied, then fails
    service_locator.set_storage(faulty)

Faults are consumed in the order they were injected, one per batch of the kind
they name (`on="write"` or `on="read"`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import anyio

from .._errors import StorageError
from ..storage import (
    RecordInfo,
    RecordRead,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOp,
    WriteOutcome,
)

R = TypeVar("R", WriteOp, RecordRead)
X = TypeVar("X")

When = Literal["before", "after", "requests", "delay", "hang"]


@dataclass
class _Fault:
    when: When
    match: Callable[[WriteOp | RecordRead], bool] | None
    seconds: float
    message: str


class FaultInjectingBackend(StorageBackend):
    """A backend around another one that fails, delays or hangs chosen batches on purpose.

    - `when="before"`: the whole batch fails before anything is applied.
    - `when="after"`: the whole batch is applied, then fails (its outcome unknown to the caller).
    - `when="requests"`: the requests `match` picks (writes, deletes or reads) fail
      alone, answered with their own error and never applied; the rest of the batch
      goes through.
    - `delay_next(seconds)`: the batch waits, then goes through.
    - `hang_next()`: the batch waits until it is cancelled.
    """

    def __init__(self, inner: StorageBackend) -> None:
        self.inner = inner
        """The wrapped backend."""
        self.url = inner.url
        self.max_batch = inner.max_batch
        self.keeps_deltas = inner.keeps_deltas
        self.faults: dict[str, deque[_Fault]] = {"write": deque(), "read": deque()}
        self.injected = 0
        """How many faults have met a batch so far."""

    def fail_next(
        self,
        *,
        on: Literal["write", "read"] = "write",
        when: Literal["before", "after", "requests"] = "before",
        match: Callable[[WriteOp | RecordRead], bool] | None = None,
        message: str = "injected fault",
    ) -> None:
        """Make the next batch of kind `on` fail as `when` says (`on="write"`: writes and deletes)."""
        if when == "requests" and match is None:
            raise ValueError("when='requests' needs match= to pick the requests that fail")
        self.faults[on].append(_Fault(when, match, 0.0, message))

    def delay_next(self, seconds: float, *, on: Literal["write", "read"] = "write") -> None:
        """Make the next batch of kind `on` wait `seconds` before it goes through."""
        self.faults[on].append(_Fault("delay", None, seconds, ""))

    def hang_next(self, *, on: Literal["write", "read"] = "write") -> None:
        """Make the next batch of kind `on` wait until it is cancelled."""
        self.faults[on].append(_Fault("hang", None, 0.0, ""))

    def _error(self, fault: _Fault) -> StorageError:
        return StorageError(f"{fault.message} ({fault.when})")

    async def _batch(
        self,
        kind: str,
        requests: Sequence[R],
        apply: Callable[[Sequence[R]], Awaitable[Sequence[X | StorageError]]],
    ) -> Sequence[X | StorageError]:
        """Hand `requests` (those that get through) to `apply`, as the next fault of `kind` says."""
        fault = self.faults[kind].popleft() if self.faults[kind] else None
        if fault is None:
            return await apply(requests)
        self.injected += 1
        if fault.when == "before":
            raise self._error(fault)
        if fault.when == "delay":
            await anyio.sleep(fault.seconds)
        elif fault.when == "hang":
            await anyio.sleep_forever()
        if fault.when != "requests":
            results = await apply(requests)
            if fault.when == "after":
                raise self._error(fault)
            return results
        assert fault.match is not None
        passing = [i for i, r in enumerate(requests) if not fault.match(r)]
        answered: list[X | StorageError] = [self._error(fault)] * len(requests)
        if passing:
            for i, result in zip(passing, await apply([requests[i] for i in passing]), strict=True):
                answered[i] = result
        return answered

    async def write_batch(self, ops: Sequence[WriteOp]) -> Sequence[WriteOutcome | StorageError]:
        return await self._batch("write", ops, self.inner.write_batch)

    async def read_batch(self, reads: Sequence[RecordRead]) -> Sequence[StoredRecord | StorageError | None]:
        return await self._batch("read", reads, self.inner.read_batch)

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        return await self.inner.open_store(name=name, id=id)

    async def list_stores(self) -> list[StoreInfo]:
        return await self.inner.list_stores()

    async def drop_store(self, store_id: str) -> None:
        await self.inner.drop_store(store_id)

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        return await self.inner.list_records(store_id, exclusive_start_key=exclusive_start_key, limit=limit)

    async def purge_store(self, store_id: str) -> None:
        await self.inner.purge_store(store_id)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        return await self.inner.read_history(store_id, key)

    async def aclose(self) -> None:
        await self.inner.aclose()
