"""A Redis Cluster master SIGKILLed under a running worker: its replica takes over, the worker goes on.

The backend meets refused connections, `CLUSTERDOWN` and moved slots while the
replica is promoted (and the old master rejoining as a replica), reads the slot
map again and retries within its budget (`retry_timeout`, 10 s by default; the
fixture's failover takes about 2.5 s).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from pydantic import BaseModel

from fleet_servers import RedisClusterServer
from recoverable_state import (
    EventManager,
    KeyValueStore,
    RecoverableState,
    StateOwnershipLost,
    service_locator,
)
from recoverable_state.storage import RecordRead, RecordWrite, WriteOutcome, open_backend

pytestmark = [pytest.mark.anyio]

WORKERS = 60


class Counter(BaseModel):
    n: int = 0


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_worker_persisting_every_100_ms_keeps_going_through_a_failover(
    cluster: RedisClusterServer, anyio_backend: str
) -> None:
    backend = open_backend(cluster.url)
    service_locator.set_storage(backend)
    manager = EventManager(persist_state_interval=timedelta(milliseconds=100))
    async with manager:
        states = [
            RecoverableState(
                default_state=Counter(),
                persist_state_key=f"worker-{i}",
                persistence_enabled=True,
                event_manager=manager,
            )
            for i in range(WORKERS)
        ]
        await RecoverableState.initialize_many(states)
        running = True

        async def work() -> None:
            while running:
                for state in states:
                    state.current_value.n += 1
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await anyio.sleep(0.5)
            assert manager.stats.persists > 0
            killed_at = datetime.now(UTC)
            began = time.monotonic()
            failover = await anyio.to_thread.run_sync(cluster.kill_master)
            # The persists resume: a round that saved every state, begun after the kill.
            with anyio.fail_after(10):
                while (manager.stats.last_success_at or killed_at) <= killed_at + timedelta(
                    seconds=failover.seconds
                ):
                    await anyio.sleep(0.05)
            resumed = time.monotonic() - began
            # The killed master comes back as a replica (READONLY to a client that still
            # believes it a master): the worker goes on through that too.
            await anyio.to_thread.run_sync(cluster.restart_node, failover.killed)
            await anyio.sleep(0.5)
            running = False
        final = [state.current_value.n for state in states]
        for state in states:
            await state.teardown()
    print(f"failover {failover.seconds:.2f} s, persists resumed {resumed:.2f} s after the kill")
    assert resumed < 10  # within the retry budget
    assert dict(manager.stats.persists_failed) == {}  # no round failed: every wait was retried
    assert manager.stats.ownership_losses == 0
    assert min(final) > 50
    kvs = await KeyValueStore.open(storage=backend)
    assert [await kvs.get_value(f"worker-{i}") for i in range(WORKERS)] == [{"n": n} for n in final]
    await backend.aclose()


@pytest.mark.slow
async def test_a_stale_writer_is_still_fenced_after_a_failover(cluster: RedisClusterServer) -> None:
    async with open_backend(cluster.url) as first, open_backend(cluster.url) as second:
        store = await first.open_store(name="fenced")
        keys = [f"job-{i}" for i in range(30)]
        assert (
            await first.write_batch([RecordWrite(store.id, k, b"1", "x") for k in keys])
            == [WriteOutcome(True, 1)] * 30
        )
        for master in cluster.master_nodes():
            master.command("WAIT", 1, 1000)  # every write on a replica: none is lost in the failover
        await anyio.to_thread.run_sync(cluster.kill_master)
        claimed = await second.read_batch([RecordRead(store.id, k, claim=True) for k in keys])
        assert [getattr(r, "version", None) for r in claimed] == [2] * 30
        stale = await first.write_batch(
            [RecordWrite(store.id, k, b"2", "x", expected_version=1) for k in keys]
        )
        assert stale == [WriteOutcome(False, 2)] * 30


async def test_a_successor_process_fences_off_the_stale_worker_on_the_cluster(
    cluster: RedisClusterServer,
) -> None:
    """The successor (another backend, as another process would have) loads and claims the
    record and moves on; the old worker is refused from then on and writes nothing."""
    async with open_backend(cluster.url) as old_storage, open_backend(cluster.url) as new_storage:

        async def store() -> KeyValueStore:
            return await KeyValueStore.open(name="jobs", storage=old_storage)

        async with EventManager() as manager:
            old = RecoverableState(
                default_state=Counter(),
                persist_state_key="job-7",
                persistence_enabled=True,
                persist_state_kvs_factory=store,
                event_manager=manager,
            )
            (await old.initialize()).n = 1
            await old.persist_state()
            successor = await KeyValueStore.open(name="jobs", storage=new_storage)
            claimed = await successor.get_record("job-7", claim=True)
            assert claimed is not None and json.loads(claimed.value) == {"n": 1}
            await successor.put_record(
                "job-7", b'{"n":100}', "application/json", expected_version=claimed.version
            )
            old.current_value.n = 2
            with pytest.raises(StateOwnershipLost, match=r"key 'job-7'.*another process"):
                await old.persist_state()
            await old.teardown()
        assert await successor.get_value("job-7") == {"n": 100}
