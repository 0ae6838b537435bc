"""The Redis Cluster the cluster backend will run on, checked with raw redis-py clients.

What these tests show is what the backend must live with (docs/dev/fleet-findings.md):
keys spread over slots, scripts confined to one slot and one node, redis-py's cluster
pipeline refusing scripts, and a killed master replaced by its replica within seconds.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import redis
import redis.exceptions
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from fleet_servers import CLUSTER_SLOTS, RedisClusterServer


def test_three_masters_with_a_replica_each_serve_every_slot(cluster: RedisClusterServer) -> None:
    for node in cluster.nodes:
        info = node.cluster_info()
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_ok"]) == CLUSTER_SLOTS
        assert int(info["cluster_known_nodes"]) == 6
    members = cluster.members()
    masters = [m for m in members if m.master]
    replicas = [m for m in members if not m.master]
    assert len(masters) == 3 and len(replicas) == 3
    assert sum(m.slot_count for m in masters) == CLUSTER_SLOTS
    assert sorted(r.master_id for r in replicas) == sorted(m.node_id for m in masters)


def test_records_spread_over_the_masters_by_key(cluster: RedisClusterServer) -> None:
    client = cluster.client()
    try:
        for i in range(300):
            client.set(f"rs:r:store:key-{i}", i)
        sizes = [node.command("DBSIZE") for node in cluster.master_nodes()]
    finally:
        client.close()
    assert sum(sizes) == 300
    assert all(size > 30 for size in sizes), sizes


def test_a_hash_tag_keeps_a_record_its_history_and_version_in_one_slot(cluster: RedisClusterServer) -> None:
    """Only the part in braces is hashed: `rs:{<store>:<key>}:r` and `:h` share a slot."""
    node = cluster.nodes[0]
    record, history = "rs:{0123abcd:state-1}:r", "rs:{0123abcd:state-1}:h"
    other = "rs:{0123abcd:state-2}:r"
    assert node.command("CLUSTER", "KEYSLOT", record) == node.command("CLUSTER", "KEYSLOT", history)
    assert node.command("CLUSTER", "KEYSLOT", record) != node.command("CLUSTER", "KEYSLOT", other)
    client = cluster.client()
    try:
        script = client.register_script(
            "redis.call('HSET', KEYS[1], 'value', ARGV[1], 'version', 1) "
            "redis.call('LPUSH', KEYS[2], ARGV[1]) return redis.call('HGET', KEYS[1], 'version')"
        )
        assert script(keys=[record, history], args=["v1"]) == b"1"
        # redis-py refuses keys of two slots before sending anything ...
        with pytest.raises(RedisClusterException, match="all keys must map to the same key slot"):
            client.eval("return 1", 2, record, other)
    finally:
        client.close()
    # ... and the server, sent them anyway, answers CROSSSLOT.
    owner = cluster.master_of_slot(int(node.command("CLUSTER", "KEYSLOT", record)))
    raw = redis.Redis(port=owner.port)
    try:
        with pytest.raises(redis.exceptions.ClusterCrossSlotError, match="don't hash to the same slot"):
            raw.eval("return 1", 2, record, other)
    finally:
        raw.close()


def test_todays_scripts_cannot_reach_keys_on_another_node(cluster: RedisClusterServer) -> None:
    """The listing, drop and purge scripts build keys inside Lua: on a cluster they fail."""
    client = cluster.client()
    try:
        key = "rs:r:store:somewhere"
        client.set(key, "x")
        owner = cluster.master_of_slot(client.keyslot(key))
        elsewhere = next(n for n in cluster.master_nodes() if n.port != owner.port)
        raw = redis.Redis(port=elsewhere.port)
        try:
            with pytest.raises(redis.exceptions.ResponseError, match="non local key in a cluster node"):
                raw.eval("return redis.call('GET', ARGV[1])", 0, key)
            with pytest.raises(redis.exceptions.MovedError):
                raw.get(key)
            with pytest.raises(redis.exceptions.ResponseError, match="SELECT is not allowed in cluster mode"):
                raw.execute_command("SELECT", 1)
        finally:
            raw.close()
        # redis-py's cluster pipeline refuses scripts outright.
        script = client.register_script("return redis.call('GET', KEYS[1])")
        with client.pipeline() as pipe, pytest.raises(RedisClusterException, match="evalsha is blocked"):
            script(keys=[key], client=pipe)
    finally:
        client.close()


def test_a_batch_runs_as_one_pipeline_of_slot_scripts_per_master(cluster: RedisClusterServer) -> None:
    """What the backend can do instead: group the writes by slot, the slots by master,
    and send each master one plain pipeline of EVALSHA calls, one per slot."""
    client = cluster.client()
    try:
        script = client.register_script(
            "for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i]) end return #KEYS"
        )
        writes = {f"rs:{{store:key-{i}}}:r": f"value-{i}" for i in range(200)}
        by_node: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for key in writes:
            node = client.get_node_from_key(key)
            by_node[node.name][client.keyslot(key)].append(key)
        assert len(by_node) == 3
        applied = 0
        for name, slots in by_node.items():
            node = client.get_node(node_name=name)
            raw = client.get_redis_connection(node)
            sha = raw.script_load(script.script)
            with raw.pipeline(transaction=False) as pipe:
                for keys in slots.values():
                    pipe.evalsha(sha, len(keys), *keys, *(writes[k] for k in keys))
                applied += sum(pipe.execute())
        assert applied == len(writes)
        assert client.get("rs:{store:key-7}:r") == b"value-7"
    finally:
        client.close()


@pytest.mark.slow
def test_a_killed_master_is_replaced_by_its_replica_with_every_replicated_write(
    cluster: RedisClusterServer,
) -> None:
    client = cluster.client()
    try:
        master = cluster.master_of_slot(0)
        keys = [k for k in (f"k{i}" for i in range(5000)) if 0 <= client.keyslot(k) <= 5460][:50]
        keys = [k for k in keys if cluster.master_of_slot(client.keyslot(k)).port == master.port]
        raw = redis.Redis(port=master.port)
        for i, key in enumerate(keys):
            raw.set(key, i)
            assert raw.wait(1, 1000) == 1  # a replica has it: what wait_replicas=1 will promise
        raw.close()
        failover = cluster.kill_master(master)
        assert failover.promoted.port != master.port
        assert failover.seconds < 15, failover
        # The cluster client finds the new master by itself (after a refused connection).
        began = time.monotonic()
        while True:
            try:
                client.set("after-failover", "1")
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() - began < 10
                time.sleep(0.05)
        assert [client.get(k) for k in keys] == [str(i).encode() for i in range(len(keys))]
        cluster.restart_node(failover.killed)
        assert failover.killed.info("replication")["role"] == "slave"
    finally:
        client.close()


def test_a_cluster_client_reaches_every_node_from_one_seed(cluster: RedisClusterServer) -> None:
    client = RedisCluster.from_url(cluster.seed_url)
    try:
        assert len(client.get_primaries()) == 3
        assert len(client.get_replicas()) == 3
    finally:
        client.close()
