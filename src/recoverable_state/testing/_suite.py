"""The conformance suite's base: capability flags, fixtures, and the helpers every check uses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import ClassVar

import pytest

from .._errors import StorageError
from ..storage import (
    KeyValueStore,
    RecordRead,
    StorageBackend,
    StoredRecord,
    WriteOp,
    WriteOutcome,
)

BYTES = "application/octet-stream"

MakeBackend = Callable[[], StorageBackend]
"""Opens a backend over the test's data (which starts empty); each call opens another one."""


def fresh_name() -> str:
    """A store name no other test uses."""
    return f"store-{uuid.uuid4().hex[:12]}"


async def open_store(backend: StorageBackend, name: str | None = None) -> KeyValueStore:
    """A new, empty store in `backend`."""
    return await KeyValueStore.open(name=name or fresh_name(), storage=backend)


async def write(backend: StorageBackend, ops: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
    """One write batch, its answers checked for shape (one per request)."""
    outcomes = list(await backend.write_batch(ops))
    assert len(outcomes) == len(ops), f"write_batch answered {len(outcomes)} times for {len(ops)} requests"
    return outcomes


async def read(
    backend: StorageBackend, reads: Sequence[RecordRead]
) -> list[StoredRecord | StorageError | None]:
    """One read batch, its answers checked for shape (one per request)."""
    found = list(await backend.read_batch(reads))
    assert len(found) == len(reads), f"read_batch answered {len(found)} times for {len(reads)} reads"
    return found


def version_of(record: StoredRecord | StorageError | None) -> int | None:
    """A read's version (None when absent); an error fails the test."""
    assert not isinstance(record, BaseException), f"a read failed: {record!r}"
    return None if record is None else record.version


class Suite:
    """What every group of checks shares; `BackendConformance` is all of them together."""

    pytestmark: ClassVar = [pytest.mark.anyio]

    keeps_history: ClassVar[bool] = True
    """The backend keeps earlier snapshots (`keep_history`); False skips the history checks."""

    durable: ClassVar[bool] = True
    """Data survives closing the backend and opening another over the same data."""

    shared: ClassVar[bool] = True
    """Backends open at once over the same data (as two processes) see each other's writes and claims."""

    large_values: ClassVar[bool] = True
    """Records of several MiB are stored (5 MiB values are written)."""

    machine_examples: ClassVar[int] = 20
    """How many random runs the stateful check (`RecordMachine`) makes."""

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        """Every async check runs on asyncio and on trio (skipped where trio is not installed)."""
        if request.param == "trio":
            pytest.importorskip("trio")
        return str(request.param)

    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        """Override: return a callable that opens a backend over this test's data, empty at first."""
        pytest.fail(f"{type(self).__name__} must define a `make_backend` fixture (see BackendConformance)")

    @pytest.fixture
    async def backend(self, make_backend: MakeBackend) -> AsyncIterator[StorageBackend]:
        """A backend over this test's (empty) data, closed after the test."""
        storage = make_backend()
        try:
            yield storage
        finally:
            await storage.aclose()

    @pytest.fixture
    async def open_more(self, make_backend: MakeBackend) -> AsyncIterator[MakeBackend]:
        """Opens more backends over this test's data (as other processes would); all closed after it."""
        made: list[StorageBackend] = []

        def more() -> StorageBackend:
            made.append(make_backend())
            return made[-1]

        try:
            yield more
        finally:
            for storage in made:
                await storage.aclose()

    def needs(self, flag: str) -> None:
        """Skip the check unless the backend has the capability `flag` names."""
        if not getattr(self, flag):
            pytest.skip(f"{type(self).__name__}.{flag} is False")
