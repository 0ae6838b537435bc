"""The Redis Cluster backend (`redis+cluster://`) on the real 6-node cluster of tests/fleet_servers.py.

The shipped conformance suite runs against it as against every store; the checks
after it are the cluster's own: records of one store spread over every master,
one batch answered per slot (a master that refuses its share fails only those
records), a dropped store leaving nothing behind, and the URL's spellings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.exceptions

from fleet_servers import RedisClusterNode, RedisClusterServer
from recoverable_state import (
    StorageAuthenticationError,
    StorageError,
    StorageUnavailableError,
    StoreNotFoundError,
)
from recoverable_state.storage import (
    JSON_CONTENT_TYPE as JSON,
)
from recoverable_state.storage import (
    RecordRead,
    RecordWrite,
    StorageBackend,
    WriteOutcome,
    open_backend,
)
from recoverable_state.storage._redis_cluster import RedisClusterBackend
from recoverable_state.storage._redis_cluster_calls import SlotCaller
from recoverable_state.testing import BackendConformance
from recoverable_state.testing.conformance import MakeBackend, check_random_batches
from servers import free_ports, start_or_skip


@pytest.fixture
def free_port() -> int:
    return free_ports(1)[0]


class TestRedisCluster(BackendConformance):
    @pytest.fixture
    def make_backend(self, cluster: RedisClusterServer) -> MakeBackend:
        return lambda: open_backend(cluster.url)

    @pytest.mark.anyio
    async def test_random_batches_cut_into_many_calls_answer_as_the_planner(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from recoverable_state.storage import _contract

        monkeypatch.setattr(_contract, "BATCH_BYTES", 3000)
        await check_random_batches(backend, "cluster-cut", keeps_history=True)


# -- the cluster's own checks --------------------------------------------------------


def _keys(node: RedisClusterNode, pattern: str) -> list[str]:
    return [k.decode() if isinstance(k, bytes) else k for k in node.command("KEYS", pattern)]


@pytest.mark.anyio
async def test_the_records_of_one_store_spread_over_every_master(cluster: RedisClusterServer) -> None:
    async with open_backend(cluster.url) as backend:
        store = await backend.open_store(name="spread")
        ops = [RecordWrite(store.id, f"job-{i}", b"{}", JSON) for i in range(300)]
        outcomes = await backend.write_batch(ops)
        assert outcomes == [WriteOutcome(True, 1)] * 300
        per_master = [len(_keys(m, f"rs:{{{store.id}.*}}:r:*")) for m in cluster.master_nodes()]
        assert sum(per_master) == 300
        assert all(n > 30 for n in per_master), per_master
        listed = await backend.list_records(store.id)
        assert [r.key for r in listed] == sorted(w.key for w in ops)


@pytest.mark.anyio
async def test_a_master_that_refuses_its_share_fails_only_those_records(cluster: RedisClusterServer) -> None:
    async with open_backend(cluster.url) as backend:
        store = await backend.open_store(name="partial")
        full = cluster.master_of_slot(0)
        full.command("CONFIG", "SET", "maxmemory", "1")
        full.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        try:
            outcomes = await backend.write_batch(
                [RecordWrite(store.id, f"job-{i}", b"{}", JSON) for i in range(60)]
            )
        finally:
            full.command("CONFIG", "SET", "maxmemory", "0")
        refused = [i for i, o in enumerate(outcomes) if isinstance(o, StorageError)]
        applied = [i for i, o in enumerate(outcomes) if o == WriteOutcome(True, 1)]
        assert refused and applied and len(refused) + len(applied) == 60
        error = outcomes[refused[0]]
        assert isinstance(error, StorageError) and "partial" in str(error) and "maxmemory" in str(error)
        reads = await backend.read_batch([RecordRead(store.id, f"job-{i}") for i in range(60)])
        assert [i for i, r in enumerate(reads) if r is None] == refused  # a refused record changed nothing
        assert all(reads[i] is not None and reads[i].version == 1 for i in applied)  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_dropped_store_leaves_only_expiring_batch_markers(cluster: RedisClusterServer) -> None:
    async with open_backend(cluster.url) as backend:
        store = await backend.open_store(name="dropped")
        await backend.write_batch(
            [RecordWrite(store.id, f"job-{i}", b"{}", JSON, keep_history=2) for i in range(50)]
        )
        await backend.drop_store(store.id)
        left = [k for m in cluster.master_nodes() for k in _keys(m, f"rs:{{{store.id}.*")]
        assert left and all(":batch:" in k for k in left)
        assert all(
            m.command("TTL", k) > 0 for m in cluster.master_nodes() for k in _keys(m, f"rs:{{{store.id}.*")
        )
        (outcome,) = await backend.write_batch([RecordWrite(store.id, "job-1", b"{}", JSON)])
        assert isinstance(outcome, StoreNotFoundError) and "dropped" in str(outcome)
        assert await backend.list_stores() == []


@pytest.mark.anyio
async def test_a_stale_slot_map_is_read_again_and_the_batch_lands(cluster: RedisClusterServer) -> None:
    """As after a resharding: the backend sends a slot to a master that no longer has it (MOVED)."""
    async with open_backend(cluster.url) as backend:
        assert isinstance(backend, RedisClusterBackend)
        store = await backend.open_store(name="moved")
        await backend.write_batch([RecordWrite(store.id, "a", b"1", JSON)])
        slots = backend._connect().nodes_manager.slots_cache
        nodes = {n[0].name: n for n in slots.values()}
        names = sorted(nodes)
        for slot, owners in slots.items():  # every slot now points at the next master
            slots[slot] = nodes[names[(names.index(owners[0].name) + 1) % len(names)]]
        outcomes = await backend.write_batch([RecordWrite(store.id, f"k{i}", b"1", JSON) for i in range(30)])
        assert outcomes == [WriteOutcome(True, 1)] * 30
        assert len(await backend.list_records(store.id)) == 31


@pytest.mark.anyio
async def test_scripts_flushed_from_every_node_are_loaded_again(cluster: RedisClusterServer) -> None:
    async with open_backend(cluster.url) as backend:
        store = await backend.open_store(name="noscript")
        await backend.write_batch([RecordWrite(store.id, f"k{i}", b"1", JSON) for i in range(20)])
        for master in cluster.master_nodes():
            master.command("SCRIPT", "FLUSH")
        outcomes = await backend.write_batch([RecordWrite(store.id, f"k{i}", b"2", JSON) for i in range(20)])
        assert outcomes == [WriteOutcome(True, 2)] * 20


@pytest.mark.anyio
async def test_the_redis_url_with_cluster_true_opens_the_same_stores(cluster: RedisClusterServer) -> None:
    seed = cluster.seed_url + "?cluster=true"
    async with open_backend(cluster.url) as first, open_backend(seed) as second:
        assert isinstance(second, RedisClusterBackend)
        a = await first.open_store(name="both")
        b = await second.open_store(name="both")
        assert a == b
        await first.write_batch([RecordWrite(a.id, "k", b"1", JSON)])
        (found,) = await second.read_batch([RecordRead(b.id, "k", claim=True)])
        assert found is not None and not isinstance(found, StorageError) and found.version == 2
        (stale,) = await first.write_batch([RecordWrite(a.id, "k", b"2", JSON, expected_version=1)])
        assert stale == WriteOutcome(False, 2)  # fenced by the other instance's claim


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/3", "only database 0"),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:notaport/", "'127.0.0.1:notaport' is not host:port"),
        ("redis+cluster://:s3cret@127.0.0.1:7000/?db=0", "query parameter 'db'"),
        ("redis://:s3cret@127.0.0.1:7000/2?cluster=true", "only database 0"),
        ("redis+cluster://127.0.0.1:7000/?cluster=false", "cluster= must be true"),
    ],
)
def test_a_bad_cluster_url_is_refused_at_open_saying_why(url: str, says: str) -> None:
    with pytest.raises(StorageError) as caught:
        open_backend(url)
    assert says in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.anyio
async def test_an_unreachable_cluster_is_retried_then_named(free_port: int) -> None:
    async with open_backend(f"redis+cluster://:s3cret@127.0.0.1:{free_port}/", retry_timeout=0.5) as backend:
        with pytest.raises(StorageUnavailableError) as caught:
            await backend.open_store(name="nowhere")
    message = str(caught.value)
    assert "Redis Cluster" in message and "unreachable for 0.5 s" in message and "nowhere" in message
    assert "s3cret" not in message


@pytest.mark.anyio
async def test_a_slot_call_whose_reply_was_lost_is_not_applied_twice(
    cluster: RedisClusterServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A master ran its share, then the connection dropped before the reply: the retry answers
    the first outcome (a write expecting version 0 would be refused, a claim would bump twice)."""
    real = SlotCaller._send
    lost: list[str] = []

    def send(self: SlotCaller, client: Any, node: Any, calls: Any) -> list[Any]:
        answers = real(self, client, node, calls)
        if not lost and not any(isinstance(a, Exception) for a in answers):
            lost.append(node.name)  # ... it ran, and its reply is lost
            return [redis.exceptions.ConnectionError("connection lost")] * len(calls)
        return answers

    async with open_backend(cluster.url) as backend:
        store = await backend.open_store(name="replayed")
        keys = [f"job-{i}" for i in range(40)]
        await backend.write_batch([RecordWrite(store.id, "warm-up", b"1", JSON)])  # scripts loaded
        monkeypatch.setattr(SlotCaller, "_send", send)
        written = await backend.write_batch(
            [RecordWrite(store.id, k, b"1", JSON, expected_version=0) for k in keys]
        )
        assert lost and written == [WriteOutcome(True, 1)] * 40
        lost.clear()
        claimed = await backend.read_batch([RecordRead(store.id, k, claim=True) for k in keys])
        assert lost and [getattr(r, "version", None) for r in claimed] == [2] * 40
        monkeypatch.setattr(SlotCaller, "_send", real)
        again = await backend.read_batch([RecordRead(store.id, k) for k in keys])
        assert [getattr(r, "version", None) for r in again] == [2] * 40


@pytest.fixture(scope="module")
def guarded_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """A cluster of its own whose every node requires a password."""
    directory = tmp_path_factory.mktemp("cluster-password")
    cluster = start_or_skip(lambda: RedisClusterServer(directory, password="s3cret-pw"))
    yield cluster
    cluster.stop()


@pytest.mark.anyio
async def test_a_password_protected_cluster_takes_the_urls_password_and_refuses_a_wrong_one(
    guarded_cluster: RedisClusterServer, anyio_backend: str
) -> None:
    cluster = guarded_cluster
    async with open_backend(cluster.url) as backend:
        store = await backend.open_store(name=f"guarded-{anyio_backend}")
        assert await backend.write_batch([RecordWrite(store.id, "k", b"1", JSON)]) == [WriteOutcome(True, 1)]
    for url in (cluster.url.replace("s3cret-pw", "wrong-pw"), cluster.url.replace(":s3cret-pw@", "")):
        async with open_backend(url, retry_timeout=5) as backend:
            began = time.monotonic()
            with pytest.raises(StorageAuthenticationError) as caught:
                await backend.open_store(name="guarded")
            assert time.monotonic() - began < 2  # at once, not retried for the budget
        assert "refused the credentials" in str(caught.value) and "guarded" in str(caught.value)
        assert "s3cret-pw" not in str(caught.value) and "wrong-pw" not in str(caught.value)
