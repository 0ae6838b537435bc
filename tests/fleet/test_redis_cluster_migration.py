"""Slots of a store moved to another master (resharding) while a worker writes to them.

The slots are migrated as `redis-cli --cluster reshard` does it, a few keys at a
time (`CLUSTER SETSLOT ... MIGRATING/IMPORTING`, `MIGRATE`, `SETSLOT ... NODE`),
so the backend meets `TRYAGAIN` (a bucket half moved), `ASK` (moved, the slot
not yet handed over) and `MOVED` (handed over), and retries through them.
"""

from __future__ import annotations

import time

import anyio
import pytest
from redis.crc import key_slot

from fleet_servers import RedisClusterNode, RedisClusterServer
from recoverable_state.storage import RecordRead, RecordWrite, WriteOutcome, open_backend
from recoverable_state.storage._redis_cluster_layout import BUCKETS, live_key

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _node_id(cluster: RedisClusterServer, node: RedisClusterNode) -> str:
    return next(m.node_id for m in cluster.members() if m.port == node.port)


def migrate(
    cluster: RedisClusterServer, slots: list[int], source: RedisClusterNode, target: RedisClusterNode
) -> None:
    """Move `slots` from `source` to `target`, two keys at a time, pausing between moves."""
    source_id, target_id = _node_id(cluster, source), _node_id(cluster, target)
    try:
        for slot in slots:
            target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 2):
                source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                time.sleep(0.01)
            for node in cluster.master_nodes():
                node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    finally:  # a migration cut short leaves no slot half-open for the next test
        for slot in slots:
            for node in (source, target):
                node.command("CLUSTER", "SETSLOT", slot, "STABLE")


async def test_a_worker_writes_on_while_its_slots_move_to_another_master(cluster: RedisClusterServer) -> None:
    async with open_backend(cluster.url) as backend:
        store = await backend.open_store(name="moving")
        keys = [f"job-{i}" for i in range(400)]
        await backend.write_batch([RecordWrite(store.id, k, b"0", "x", keep_history=1) for k in keys])
        source, target = cluster.master_nodes()[:2]
        # Two buckets of the store can hash to one slot: each slot is moved once.
        slots = [
            slot
            for slot in dict.fromkeys(key_slot(live_key(store.id, b).encode()) for b in range(BUCKETS))
            if cluster.master_of_slot(slot).port == source.port
        ]
        assert slots
        batches = 0
        done = False

        async def write() -> None:
            nonlocal batches
            while not done:
                outcomes = await backend.write_batch(
                    [RecordWrite(store.id, k, b"%d" % batches, "x", keep_history=1) for k in keys]
                )
                assert outcomes == [WriteOutcome(True, batches + 2)] * len(keys)
                batches += 1

        listings = 0

        async def list_all() -> None:
            nonlocal listings
            while not done:
                listed = await backend.list_records(store.id)
                assert [r.key for r in listed] == sorted(keys)
                listings += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            tg.start_soon(list_all)
            await anyio.to_thread.run_sync(migrate, cluster, slots, source, target)
            done = True
        assert batches > 3 and listings > 3
        assert all(cluster.master_of_slot(slot).port == target.port for slot in slots)
        found = await backend.read_batch([RecordRead(store.id, k) for k in keys])
        assert {getattr(r, "version", None) for r in found} == {batches + 1}
        assert [r.key for r in await backend.list_records(store.id)] == sorted(keys)
