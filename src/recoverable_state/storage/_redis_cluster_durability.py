"""The Redis Cluster backend's durability: the single-server options, per master.

`wait_replicas`, `wait_timeout` and `fsync` mean what they mean on one server
(`_redis_durability.py`): each master's share of a write batch (and of a load's
claims) is followed, in its pipeline, by `WAITAOF` / `WAIT` on the same
connection (`_redis_cluster_calls.py`); a master that falls short answers its
applied writes with NotDurableError, the other masters' writes are unaffected.

At open (the backend's first connection) every master is read as one server is
(HELLO, CONFIG GET, INFO where the ACL allows) and refuses what it cannot honour
(fsync on a Redis before 7.2, WAIT refused to the user). One WARNING per
backend says when an acknowledged write can be lost: a master's persistence
settings, or, without `wait_replicas`, a failover (replication is asynchronous:
a write the master acknowledged and died before sending is not on the replica
promoted in its place).
"""

from __future__ import annotations

import logging

from redis.cluster import ClusterNode, RedisCluster

from ._backend import Durability
from ._redis_durability import (
    ServerFacts,
    WaitOptions,
    describe,
    losable,
    note_unread,
    read_facts,
    refuse_unhonoured,
)

_log = logging.getLogger("recoverable_state.storage")

_RANK = {False: 0, None: 1, True: 2}
"""The weakest durability first."""


def _masters(client: RedisCluster) -> list[ClusterNode]:
    found: list[ClusterNode] = client.get_primaries()  # type: ignore[no-untyped-call]
    return sorted(found, key=lambda n: n.name)


def master_facts(client: RedisCluster) -> dict[str, ServerFacts]:
    """What each master (`host:port`) says of itself, as one server would."""
    return {node.name: read_facts(client.get_redis_connection(node)) for node in _masters(client)}


def check_cluster_at_open(client: RedisCluster, url: str, options: WaitOptions) -> dict[str, ServerFacts]:
    """Refuse options a master cannot honour (StorageError naming it); warn once of losable writes."""
    facts = master_facts(client)
    for node in _masters(client):
        where = f"Redis Cluster master {node.name} ({url})"
        refuse_unhonoured(client.get_redis_connection(node), facts[node.name], where, options)
    note_unread(f"Redis Cluster {url}", (name for f in facts.values() for name in f.refused))
    risk = cluster_losable(facts, options)
    if risk:
        _log.warning("Redis Cluster %s: an acknowledged write can be lost: %s", url, risk)
    return facts


def failover_risk(facts: dict[str, ServerFacts], options: WaitOptions) -> str | None:
    """How a failover can lose acknowledged writes (None: `wait_replicas` waits for them, or no replica)."""
    if options.replicas or not any((f.replicas or 0) > 0 for f in facts.values()):
        return None
    return (
        "replication is asynchronous, so a master that fails over to its replica loses the writes "
        "it acknowledged and had not sent yet (wait_replicas=1 waits for them)"
    )


def cluster_losable(facts: dict[str, ServerFacts], options: WaitOptions) -> str | None:
    """How an acknowledged write can be lost on this cluster (None: it cannot, or unknown)."""
    risks = {name: losable(f, options) for name, f in facts.items()}
    found = [r for r in risks.values() if r]
    parts = [failover_risk(facts, options)]
    if found and len(set(risks.values())) == 1:
        parts.append(f"on every master, {found[0]}")
    else:
        parts += [f"on master {name}, {risk}" for name, risk in risks.items() if risk]
    return "; ".join(p for p in parts if p) or None


def describe_cluster(facts: dict[str, ServerFacts], options: WaitOptions) -> Durability:
    """The Durability of a Redis Cluster backend: every master's summary when they agree, else the weakest."""
    each = {name: describe(f, options) for name, f in facts.items()}
    details = {
        "masters": ", ".join(each),
        "wait_replicas": str(options.replicas),
        "fsync": "true" if options.fsync else "false",
    }
    for name, d in each.items():
        details.update(
            {f"{name} {k}": v for k, v in d.details.items() if k not in ("wait_replicas", "fsync")}
        )
    if not each:
        return Durability("redis-cluster", None, "unknown: no master answered", details)
    summaries = {d.summary for d in each.values()}
    if len(summaries) == 1:
        masters = f"every master ({len(each)}): {summaries.pop()}"
    else:
        name, weakest = min(each.items(), key=lambda item: _RANK[item[1].durable_on_ack])
        masters = f"the weakest master, {name} (of {len(each)}): {weakest.summary}"
    durable = min((d.durable_on_ack for d in each.values()), key=lambda v: _RANK[v])
    failover = failover_risk(facts, options)
    if failover is None:
        return Durability("redis-cluster", durable, masters, details)
    return Durability(
        "redis-cluster",
        False,
        f"an acknowledged write can be lost in a failover: {failover}; {masters}",
        details,
    )
