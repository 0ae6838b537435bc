"""Deltas on the Redis Cluster backend: the conformance delta checks run in
tests/fleet/test_redis_cluster_backend.py (TestRedisCluster is a BackendConformance);
here, appends spread over every bucket of a store land in their own slot and read back.
"""

from __future__ import annotations

import pytest

from fleet_servers import RedisClusterServer
from recoverable_state.storage import RecordAppend, RecordRead, RecordWrite, WriteOutcome, open_backend
from recoverable_state.storage._chain import CHAIN_CONTENT_TYPE, DELTA_CONTENT_TYPE, unpack_chain

pytestmark = pytest.mark.anyio


async def test_appends_over_many_slots_read_back_as_chains(cluster: RedisClusterServer) -> None:
    backend = open_backend(cluster.url)
    try:
        store = await backend.open_store(name="cluster-deltas")
        keys = [f"k{i}" for i in range(200)]
        await backend.write_batch([RecordWrite(store.id, k, b'{"n":0}', "application/json") for k in keys])
        appends = [RecordAppend(store.id, k, b'[["s",["n"],1]]', DELTA_CONTENT_TYPE, 1) for k in keys]
        assert await backend.write_batch(appends) == [WriteOutcome(True, 2)] * len(keys)
        assert await backend.write_batch(appends[:1]) == [WriteOutcome(False, 2)]  # fenced
        found = await backend.read_batch([RecordRead(store.id, k, claim=True) for k in keys])
        for record in found:
            assert record is not None and not isinstance(record, Exception)
            assert (record.content_type, record.version) == (CHAIN_CONTENT_TYPE, 3)
            assert len(unpack_chain(record.value)) == 2
        await backend.purge_store(store.id)
        assert await backend.read_batch([RecordRead(store.id, keys[0])]) == [None]
    finally:
        await backend.aclose()
