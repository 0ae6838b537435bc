"""Script calls of one slot each, sent to a Redis Cluster as one plain pipeline per master.

redis-py's cluster pipeline refuses scripts, and one script may only touch keys
of one slot. So a batch becomes one `EVALSHA` per slot (`SlotCall`), grouped by
the master that owns the slot; each master gets one pipeline on its own
connection, the masters at once in worker threads. Every call answers alone
(`execute(raise_on_error=False)`):

- `NOSCRIPT` (a node that never saw the script, such as a replica just promoted):
  the scripts are loaded on that node and the call is sent again at once;
- `MOVED`/`ASK`, `CLUSTERDOWN`, `TRYAGAIN`, `READONLY`, a lost connection: the
  slot map is read again and the attempt fails with that error, which the
  caller retries within its budget (`ServerBackend._retrying`); calls that
  already answered are not sent again;
- any other error reply is that call's own answer.

Mutating scripts carry a batch marker in their slot, so a call sent again after
a lost reply answers its first outcome instead of applying twice.

With `Waits` (a write batch, a read batch with claims, and the URL's
`wait_replicas` or `fsync`), each master's pipeline ends with a `PEXPIRE` of
every call's marker (so that the connection has written something to wait for,
even when every call replayed its first outcome) and `WAITAOF` / `WAIT`
(`_redis_durability.py`) on the same connection. A master that fell short
answers each of its calls as `Unconfirmed`: the reply, and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
import redis.exceptions
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from ._backend import RecordAppend, RecordDelete, RecordRead, WriteOp
from ._redis_cluster_layout import (
    BUCKETS,
    bucket_of,
    history_prefix,
    index_key,
    live_key,
    marker_key,
    record_prefix,
)
from ._redis_durability import WaitOptions, add_waits, shortfall
from ._server import Failure

RETRIED = (
    redis.exceptions.ConnectionError,  # also BusyLoadingError (a node loading its data)
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,  # also MasterDownError
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,  # also MovedError
    redis.exceptions.ReadOnlyError,  # a master we knew is now a replica
    redis.exceptions.SlotNotCoveredError,
    OSError,
)
"""What a cluster answers while its topology changes: retried after reading the slot map again."""

_RESENDS = 3
"""How often one attempt sends again at once the calls that met `NOSCRIPT`."""


def classify(exc: BaseException) -> Failure | None:
    """What kind of failure a redis-py error met on a cluster is (None: not the server's)."""
    if isinstance(exc, redis.exceptions.AuthenticationError):  # a ConnectionError too
        return Failure.AUTHENTICATION
    if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
        return Failure.SILENT
    if isinstance(exc, RETRIED):
        return Failure.UNREACHABLE
    if isinstance(exc, redis.exceptions.RedisClusterException):
        # Raised while reading the slot map: no seed answered (or each refused the
        # credentials, the cause), or the nodes disagree mid-failover.
        if isinstance(exc.__cause__, redis.exceptions.AuthenticationError):
            return Failure.AUTHENTICATION
        text = str(exc)
        changing = any(s in text for s in ("cannot be connected", "could not agree", "not covered"))
        return Failure.UNREACHABLE if changing else Failure.FAILED
    if isinstance(exc, redis.exceptions.RedisError):
        return Failure.FAILED
    return None


class SlotCall(NamedTuple):
    """One script call whose keys all share one slot (the slot of `keys[0]`)."""

    script: str
    keys: list[str]
    args: list[Any]


class Waits(NamedTuple):
    """What each master's share of one operation waits for after its calls."""

    options: WaitOptions
    ms: int
    """How long each WAIT / WAITAOF may take."""
    ttl: int
    """The batch markers' lifetime (ms), renewed by the PEXPIRE that precedes the waits."""
    did: str
    """What the calls did, for the message: "written to" or "claimed on"."""
    where: str
    """The cluster, for the message (its URL without the password)."""


class Unconfirmed(NamedTuple):
    """A call's reply from a master whose replicas (or AOF) did not confirm it in time."""

    reply: Any
    message: str
    acknowledged: int | None
    """How many replicas acknowledged (None: not a replica count)."""


class SlotCaller:
    """Runs `SlotCall`s on a cluster client: per master one pipeline, the masters at once."""

    def __init__(self, scripts: Mapping[str, str]) -> None:
        self._sources = dict(scripts)
        self._shas = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in scripts.items()}
        self._refresh_lock = threading.Lock()

    def refresh(self, client: RedisCluster) -> None:
        """Read the slot map again (after a failover or a moved slot); a failure is left to the retry."""
        # A failure (every seed down for now) is left to the next attempt.
        with self._refresh_lock, contextlib.suppress(Exception):
            client.nodes_manager.initialize()

    async def run(
        self,
        client: RedisCluster,
        calls: Sequence[SlotCall],
        done: dict[int, Any],
        waits: Waits | None = None,
    ) -> list[Any]:
        """Each call's reply (an exception for a call that failed alone; `Unconfirmed` for one
        whose master's waits fell short), in order.

        `done` keeps the replies already received across attempts of one operation:
        a retried attempt sends only the calls still missing.
        """
        pending = [i for i in range(len(calls)) if i not in done]
        for _ in range(_RESENDS):
            if not pending:
                break
            replies = await self._send_all(client, calls, pending, waits)
            again: list[int] = []
            retried: BaseException | None = None
            for i, reply in replies.items():
                if isinstance(reply, redis.exceptions.NoScriptError):
                    again.append(i)
                elif isinstance(reply, RETRIED):
                    retried = retried or reply
                else:
                    done[i] = reply
            if retried is not None:
                await anyio.to_thread.run_sync(self.refresh, client, abandon_on_cancel=True)
                raise retried
            pending = sorted(again)
        if pending:
            raise redis.exceptions.TryAgainError("scripts kept missing on a node after loading them")
        return [done[i] for i in range(len(calls))]

    async def _send_all(
        self, client: RedisCluster, calls: Sequence[SlotCall], pending: Sequence[int], waits: Waits | None
    ) -> dict[int, Any]:
        by_node: dict[str, list[int]] = defaultdict(list)
        nodes: dict[str, ClusterNode] = {}
        for i in pending:
            node = client.nodes_manager.get_node_from_slot(key_slot(calls[i].keys[0].encode()))
            by_node[node.name].append(i)
            nodes[node.name] = node
        replies: dict[int, Any] = {}

        async def send(name: str) -> None:
            indices = by_node[name]
            answers = await anyio.to_thread.run_sync(
                self._send, client, nodes[name], [calls[i] for i in indices], waits, abandon_on_cancel=True
            )
            replies.update(zip(indices, answers, strict=True))

        if len(by_node) == 1:
            await send(next(iter(by_node)))
        else:
            async with anyio.create_task_group() as tg:
                for name in by_node:
                    tg.start_soon(send, name)
        return replies

    def _send(
        self, client: RedisCluster, node: ClusterNode, calls: Sequence[SlotCall], waits: Waits | None = None
    ) -> list[Any]:
        """One pipeline to one master (in a worker thread); a lost connection answers every call."""
        conn = client.get_redis_connection(node)
        try:
            with conn.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.evalsha(self._shas[call.script], len(call.keys), *call.keys, *call.args)
                if waits is not None:
                    for call in calls:  # the markers: see the module's docstring
                        pipe.pexpire(call.keys[0], waits.ttl)
                    add_waits(pipe, waits.options, waits.ms)
                answers = list(pipe.execute(raise_on_error=False))
            if any(isinstance(a, redis.exceptions.NoScriptError) for a in answers):
                for source in self._sources.values():
                    conn.script_load(source)
        except RETRIED as exc:
            return [exc] * len(calls)
        if waits is None:
            return answers
        acks = answers[2 * len(calls) :]
        lost = next((a for a in acks if isinstance(a, RETRIED)), None)
        if lost is not None:  # sent again: the calls that ran answer their first outcome
            return [lost] * len(calls)
        short = shortfall(acks, waits.options, waits.ms, f"{waits.did} {waits.where} (master {node.name})")
        if short is None:
            return answers[: len(calls)]
        return [a if isinstance(a, BaseException) else Unconfirmed(a, *short) for a in answers[: len(calls)]]


# -- the calls of a batch --------------------------------------------------------------

Bucket = tuple[str, int]
"""(store id, bucket): one slot of a store."""


def buckets(pairs: Iterable[tuple[int, str, str]]) -> dict[Bucket, list[int]]:
    """The positions of a batch's requests, given as (position, store id, key), by bucket, in order."""
    found: dict[Bucket, list[int]] = defaultdict(list)
    for i, store_id, key in pairs:
        found[(store_id, bucket_of(key))].append(i)
    return found


def every_bucket(script: str, store_id: str, *, argv: Callable[[int], list[Any]]) -> list[SlotCall]:
    """One call of `script` per bucket of a store, with KEYS (live, index) and `argv(bucket)`."""
    return [
        SlotCall(script, [live_key(store_id, b), index_key(store_id, b)], argv(b)) for b in range(BUCKETS)
    ]


def write_calls(
    ops: Sequence[WriteOp], groups: dict[Bucket, list[int]], batch: str, ttl: int, now: int
) -> list[SlotCall]:
    """One `WRITE` call per bucket of the batch (see `_redis_scripts.py` for its KEYS and ARGV)."""
    calls = []
    for (store_id, b), members in groups.items():
        keys = [marker_key(store_id, b, batch), live_key(store_id, b)]
        args: list[Any] = [ttl, now]
        records, history, index = (
            record_prefix(store_id, b),
            history_prefix(store_id, b),
            index_key(store_id, b),
        )
        for i in members:
            w = ops[i]
            keys += [records + w.key, history + w.key, index]
            expected = "" if w.expected_version is None else w.expected_version
            if isinstance(w, RecordDelete):
                args += [store_id, w.key, expected, "d", "", ""]
                continue
            value = w.value if isinstance(w.value, bytes) else bytes(w.value)
            keep = "a" if isinstance(w, RecordAppend) else max(w.keep_history, 0)
            args += [store_id, w.key, expected, keep, w.content_type, value]
        calls.append(SlotCall("write", keys, args))
    return calls


def read_calls(
    reads: Sequence[RecordRead], groups: dict[Bucket, list[int]], batch: str, ttl: int
) -> list[SlotCall]:
    """One `READ` call per bucket of the batch (a marker only where something is claimed)."""
    calls = []
    for (store_id, b), members in groups.items():
        keys = [marker_key(store_id, b, batch), live_key(store_id, b)]
        args: list[Any] = [ttl if any(reads[i].claim for i in members) else 0]
        records = record_prefix(store_id, b)
        for i in members:
            keys.append(records + reads[i].key)
            args += [store_id, "1" if reads[i].claim else "0"]
        calls.append(SlotCall("read", keys, args))
    return calls
