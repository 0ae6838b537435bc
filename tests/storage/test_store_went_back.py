"""A store that lost writes is a recoverable fault, not a takeover; a newer record is still fenced.

A server restarted without its data, a failover to a standby that had not
received the last commits: the record is missing, older than the one this
process wrote, or its whole store is gone. The next persist writes the state
again (making the store again by its name), with a WARNING naming store and
key; it never reports the record as taken over. A record another process
claimed since is newer, and still fences this one off. Every store, both loops.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import BaseModel

from recoverable_state import KeyValueStore, RecoverableState, StateOwnershipLost, service_locator
from recoverable_state.storage import RecordDelete, RecordWrite, StorageBackend, open_backend

pytestmark = pytest.mark.anyio


class Progress(BaseModel):
    done: int = 0


@pytest.fixture
async def storage(storage_url: str) -> Any:
    backend = open_backend(storage_url)
    service_locator.set_storage(backend)
    yield backend
    await backend.aclose()


async def started(done: int) -> RecoverableState[Progress]:
    state = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled="explicit_only"
    )
    value = await state.initialize()
    for n in range(1, done + 1):  # a few writes: the record's version moves past 1
        value.done = n
        await state.persist_state()
    return state


async def loaded() -> Progress:
    fresh = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled="explicit_only"
    )
    value = await fresh.initialize()
    await fresh.teardown()
    return value


def warned(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and words in r.getMessage()
    ]


async def test_a_record_gone_from_the_server_is_written_again_with_a_warning(
    storage: StorageBackend, caplog: pytest.LogCaptureFixture
) -> None:
    state = await started(3)
    kvs = await KeyValueStore.open()
    (outcome,) = await storage.write_batch([RecordDelete(kvs.id, "p")])  # the server lost it
    assert outcome.applied
    state.current_value.done = 4
    with caplog.at_level(logging.WARNING, logger="recoverable_state"):
        await state.persist_state()  # no StateOwnershipLost
    assert not state.ownership_lost
    (message,) = warned(caplog, "older than version")
    assert "store 'default', key 'p'" in message
    await state.teardown()
    assert await loaded() == Progress(done=4)


async def test_a_record_older_than_the_one_written_is_written_again(
    storage: StorageBackend, caplog: pytest.LogCaptureFixture
) -> None:
    state = await started(4)
    kvs = await KeyValueStore.open()
    stale = b'{"done":1}'
    await storage.write_batch(
        [RecordDelete(kvs.id, "p"), RecordWrite(kvs.id, "p", stale, "application/json")]
    )
    state.current_value.done = 5  # the store now holds version 1, older than this process's 4
    with caplog.at_level(logging.WARNING, logger="recoverable_state"):
        await state.persist_state()
    assert warned(caplog, "the server lost writes")
    await state.teardown()
    assert await loaded() == Progress(done=5)


async def test_a_store_gone_from_the_server_is_made_again_and_the_state_written(
    storage: StorageBackend, caplog: pytest.LogCaptureFixture
) -> None:
    state = await started(2)
    kvs = await KeyValueStore.open()
    await storage.drop_store(kvs.id)  # the whole store lost (a server restarted empty)
    state.current_value.done = 3
    with caplog.at_level(logging.WARNING, logger="recoverable_state"):
        await state.persist_state()
    assert warned(caplog, "is gone from its server")
    await state.teardown()
    assert await loaded() == Progress(done=3)


async def test_a_record_claimed_by_another_process_is_still_newer_and_fences(storage: StorageBackend) -> None:
    state = await started(2)
    kvs = await KeyValueStore.open()
    await kvs.get_record("p", claim=True)  # a successor loads it
    state.current_value.done = 9
    with pytest.raises(StateOwnershipLost):
        await state.persist_state()
    assert state.ownership_lost
