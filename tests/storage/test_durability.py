"""Every store says what an acknowledged write means (`describe_durability`), both loops."""

from __future__ import annotations

import pytest

from recoverable_state.storage import Durability, StorageBackend, open_backend

pytestmark = pytest.mark.anyio

EXPECTED = {
    "memory": ("memory", False),
    "sqlite": ("sqlite", True),
    "file": ("file", True),
    "redis": ("redis", True),  # the test server: appendonly yes, appendfsync always
    "postgresql": ("postgresql", True),  # synchronous_commit on
}


async def test_each_store_describes_its_durability(storage_url: str, backend_kind: str) -> None:
    backend = open_backend(storage_url)
    try:
        durability = await backend.describe_durability()
    finally:
        await backend.aclose()
    assert isinstance(durability, Durability)
    assert (durability.store_kind, durability.durable_on_ack) == EXPECTED[backend_kind]
    assert durability.summary
    assert durability.as_dict()["details"] == durability.details
    if backend_kind == "sqlite":
        assert durability.details == {
            "path": durability.details["path"],
            "synchronous": "FULL",
            "journal_mode": "wal",
        }


async def test_a_backend_that_does_not_say_is_unknown() -> None:
    class Quiet(StorageBackend):  # a plug-in of before describe_durability
        url = "quiet://"
        open_store = list_stores = drop_store = read_batch = write_batch = None  # type: ignore[assignment]
        list_records = read_history = aclose = None  # type: ignore[assignment]

    Quiet.__abstractmethods__ = frozenset()
    durability = await Quiet().describe_durability()
    assert (durability.store_kind, durability.durable_on_ack) == ("Quiet", None)
    assert durability.summary.startswith("unknown")
