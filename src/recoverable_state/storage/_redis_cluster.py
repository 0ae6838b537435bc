"""Redis Cluster backend (`redis+cluster://host:port,host:port/`): records spread over slots by key.

A store's records live in `BUCKETS` buckets, each one hash tag and so one slot
(`_redis_cluster_layout.py`): a record, its history, its version, the bucket's
index of keys and the bucket's "store exists" marker share a slot. Each bucket's
share of a batch is one call of the single-server Lua scripts (`_redis_scripts.py`),
which decide every compare-and-set, claim, history trim and missing store
atomically inside Redis, as the record contract (`_contract.py`) says. The
calls of a batch go to their masters as one pipeline per master, the masters at
once (`_redis_cluster_calls.py`).

What is atomic: everything one record's requests do in one batch (its
compare-and-set, history and index), so fencing holds per record as on one
server: a claim bumps the version in the same script that reads it. A batch as
a whole is not: its buckets apply independently. A bucket whose call failed with
an error of its own (a master out of memory) answers its requests with that
error and changed nothing; the others apply.

Listing: each bucket's index is read from the key after the start (at most
`limit` keys each, one pipeline per master), the runs are merged, and the
metadata of the page's records is read per bucket. Every script names every
key it touches, so that while a slot migrates Redis answers `TRYAGAIN` or
`ASK` (retried) rather than a script failing on a key that moved. Dropping a
store removes it from the registry, then each bucket's marker (a write that
arrives later finds none in its own slot and answers "no such store"), then
its records, 1,000 keys per bucket and call; a purge does the last step.

Failover: a lost connection, `MOVED`, `CLUSTERDOWN`, `TRYAGAIN` or `READONLY`
makes the backend read the slot map again and retry within `retry_timeout`
(the same bounded retries as the single-server backend, `_server.py`); a
bucket's call that ran before its reply was lost answers its first outcome
(the batch marker). The retry budget must exceed the cluster's failover time
(`cluster-node-timeout` plus about 1.5 s). Replication is asynchronous: a write
acknowledged by a master that dies before its replica received it is lost, unless
`wait_replicas` made each master's share wait for its replicas
(`_redis_cluster_durability.py`: the single-server options, per master).

Connections: redis-py's cluster client keeps a pool per node and opens
connections as worker threads need them (one per master per operation in
flight); `pool_size` is accepted for the common options but caps nothing here.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.retry import Retry

from .._errors import NotDurableError, StorageError, StoreNotFoundError
from .._forks import watch_forks
from ._backend import (
    Durability,
    RecordDelete,
    RecordInfo,
    RecordRead,
    StoredRecord,
    StoreInfo,
    WriteOp,
    WriteOutcome,
)
from ._contract import split_by_size
from ._redis import _text, _time
from ._redis_cluster_calls import (
    RETRIED,
    SlotCall,
    SlotCaller,
    Unconfirmed,
    Waits,
    buckets,
    classify,
    every_bucket,
    read_calls,
    write_calls,
)
from ._redis_cluster_durability import check_cluster_at_open, describe_cluster, master_facts
from ._redis_cluster_layout import (
    BUCKETS,
    FORGET,
    HISTORY,
    META,
    NAMES,
    PAGE,
    PURGE_KEYS,
    REGISTRY,
    UNREGISTER,
    bucket_of,
    history_prefix,
    index_key,
    live_key,
    record_prefix,
)
from ._redis_deltas import CHAIN_CONTENT_TYPE, chain_of
from ._redis_durability import ServerFacts, WaitOptions, wait_ms, wait_options
from ._redis_scripts import OPEN, READ, WRITE
from ._server import Failure, ServerBackend

T = TypeVar("T")

_SCRIPTS = {
    "write": WRITE,
    "read": READ,
    "page": PAGE,
    "meta": META,
    "purge": PURGE_KEYS,
    "forget": FORGET,
    "open": OPEN,
    "unregister": UNREGISTER,
    "history": HISTORY,
}

_CONNECT_TIMEOUT = 5.0
"""Seconds one connection attempt may take at most (less when the budget is shorter)."""


def _never() -> None:
    """What closing a client inherited from the parent process does: nothing."""


class RedisClusterBackend(ServerBackend):
    """Stores records in a Redis Cluster; each slot's share of a batch is one atomic script call."""

    server_name = "Redis Cluster"
    keeps_deltas = True

    def __init__(
        self,
        url: str,
        *,
        startup_nodes: Sequence[tuple[str, int]],
        connection: dict[str, Any] | None = None,
        pool_size: int = 4,
        retry_timeout: float = 10.0,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        fsync: bool | None = None,
    ) -> None:
        super().__init__(url, pool_size=pool_size, retry_timeout=retry_timeout)
        self.durability_options: WaitOptions
        """What each master's share of a write batch waits for (`wait_replicas`, `wait_timeout`, `fsync`)."""
        self.durability_options, _ = wait_options(
            url, wait_replicas=wait_replicas, wait_timeout=wait_timeout, fsync=fsync
        )
        self._facts: dict[str, ServerFacts] | None = None  # what the masters said at open (checked once)
        if not startup_nodes:
            raise ValueError("a Redis Cluster needs at least one node to start from")
        self._nodes = list(startup_nodes)
        self._options = dict(connection or {})
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None
        self._calls = SlotCaller(_SCRIPTS)
        self._registry_scripts: dict[str, Script] = {}
        self._inherited: list[RedisCluster] = []  # a forked child's clients of its parent (never used)
        watch_forks(self)

    # -- plumbing -----------------------------------------------------------

    def _connect(self) -> RedisCluster:
        """The cluster client, built on first use (in a worker thread: it reads the slot map)."""
        with self._lock:
            if self._client is None:
                client = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in self._nodes],  # type: ignore[no-untyped-call]
                    retry=Retry(NoBackoff(), 0),  # retries happen here, with our budget
                    socket_connect_timeout=min(self._wait, _CONNECT_TIMEOUT),
                    socket_timeout=self._wait,
                    decode_responses=False,
                    **self._options,
                )
                if self._facts is None:
                    try:  # at open: refuse what a master cannot honour, warn once
                        self._facts = check_cluster_at_open(client, self.url, self.durability_options)
                    except BaseException:
                        client.close()
                        raise
                self._client = client
            return self._client

    async def _run(self, store: str | None, call: Callable[[RedisCluster], T]) -> T:
        """`call(client)` in a worker thread, retried within the budget; the slot map is
        read again after an error that says the cluster changed."""

        def attempt() -> T:
            client = self._connect()
            try:
                return call(client)
            except RETRIED:
                self._calls.refresh(client)
                raise

        return await self._retrying(
            store, lambda deadline: anyio.to_thread.run_sync(attempt, abandon_on_cancel=True)
        )

    async def _slot_calls(
        self, store: str, calls: Sequence[SlotCall], waits: Waits | None = None
    ) -> list[Any]:
        """Every call's reply, each call sent once more until it answers (within the budget)."""
        done: dict[int, Any] = {}

        async def attempt(deadline: float) -> list[Any]:
            client = await anyio.to_thread.run_sync(self._connect, abandon_on_cancel=True)
            return await self._calls.run(client, calls, done, waits)

        return await self._retrying(store, attempt)

    def _classify(self, exc: BaseException) -> Failure | None:
        return classify(exc)

    def _failed(self, store_id: str, exc: BaseException) -> StorageError:
        """The error a request answers with when its slot's call failed alone."""
        return self._error(Failure.FAILED, self._label([store_id]), self._describe(exc))

    def _gone(self, store_id: str) -> StorageError:
        return StoreNotFoundError("no such store (was it dropped?)", store=self._label([store_id]))

    def _ttl(self) -> int:
        """How long (ms) a batch marker outlives the retry budget."""
        return int((self.retry_timeout + 60) * 1000)

    def _waits(self, did: str) -> Waits | None:
        """What each master's share of a mutating operation waits for (None: nothing)."""
        options = self.durability_options
        if not options.waits:
            return None
        return Waits(options, wait_ms(options, self._wait), self._ttl(), did, f"Redis Cluster {self.url}")

    # -- stores -------------------------------------------------------------

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find(client: RedisCluster) -> StoreInfo:
            if id is not None:
                found = client.hget(REGISTRY, id)
                if found is None:
                    raise StoreNotFoundError(f"no store has this id in {self.url}", store=id)
                raw = _text(found)
                return StoreInfo(id, raw[1:] if raw.startswith("=") else None)
            if name is not None and (known := client.hget(NAMES, name)) is not None:
                return StoreInfo(_text(known), name)
            new_id = uuid.uuid4().hex
            self._markbuckets(client, new_id, live=True)  # before the registry names the store
            if name is None:
                client.hset(REGISTRY, new_id, "-")
                return StoreInfo(new_id, None)
            got = _text(self._calls_one(client, "open", [NAMES, REGISTRY], [name, new_id]))
            if got != new_id:  # another process made the store first
                self._markbuckets(client, new_id, live=False)
            return StoreInfo(got, name)

        info = await self._run(name if id is None else id, find)
        self._labels[info.id] = info.label
        return info

    @staticmethod
    def _markbuckets(client: RedisCluster, store_id: str, *, live: bool) -> None:
        with client.pipeline() as pipe:  # type: ignore[no-untyped-call]
            for b in range(BUCKETS):
                if live:
                    pipe.hset(live_key(store_id, b), store_id, "1")
                else:
                    pipe.delete(live_key(store_id, b))
            pipe.execute()

    def _calls_one(self, client: RedisCluster, script: str, keys: list[str], args: list[Any]) -> Any:
        """One script call of the registry's slot through the cluster client (which follows MOVED)."""
        if script not in self._registry_scripts:
            self._registry_scripts[script] = client.register_script(_SCRIPTS[script])
        return self._registry_scripts[script](keys=keys, args=args)

    async def list_stores(self) -> list[StoreInfo]:
        def rows(client: RedisCluster) -> list[StoreInfo]:
            found: dict[bytes, bytes] = client.hgetall(REGISTRY)  # type: ignore[assignment]
            return [
                StoreInfo(_text(i), _text(n)[1:] if n.startswith(b"=") else None) for i, n in found.items()
            ]

        stores = await self._run(None, rows)
        return sorted(stores, key=lambda s: (s.name or "", s.id))

    async def drop_store(self, store_id: str) -> None:
        label = self._label([store_id])
        await self._run(label, lambda c: self._calls_one(c, "unregister", [NAMES, REGISTRY], [store_id]))
        self._raise_any(
            store_id, await self._slot_calls(label, every_bucket("forget", store_id, argv=lambda b: []))
        )
        await self._purge(store_id, check=False)

    def _raise_any(self, store_id: str, replies: Sequence[Any]) -> None:
        for reply in replies:
            if isinstance(reply, BaseException):
                raise self._failed(store_id, reply) from reply

    async def purge_store(self, store_id: str) -> None:
        await self._purge(store_id, check=True)

    async def _purge(self, store_id: str, *, check: bool) -> None:
        """Delete the store's records, 1,000 keys per bucket and script call, until no bucket has any.

        With `check`, a bucket whose store is gone stops it (StoreNotFoundError); without, it
        ends a drop whose markers are already deleted."""
        while pages := [
            (b, page) for b, page in enumerate(await self._pages(store_id, "-", 1000, check)) if page
        ]:
            calls = []
            for b, page in pages:
                records, history = record_prefix(store_id, b), history_prefix(store_id, b)
                keys = [live_key(store_id, b), index_key(store_id, b)]
                for key in page:
                    keys += [records + key, history + key]
                calls.append(SlotCall("purge", keys, [store_id if check else "", *page]))
            replies = await self._slot_calls(self._label([store_id]), calls)
            self._raise_any(store_id, replies)
            if not all(replies):
                raise StoreNotFoundError("no such store (was it dropped?)", store=self._label([store_id]))

    async def _pages(self, store_id: str, lowest: str, count: int, check: bool = True) -> list[list[str]]:
        """Each bucket's keys after `lowest` (at most `count`, -1: all), each in order; with `check`,
        StoreNotFoundError when the store is missing."""
        label = self._label([store_id])
        argv = [store_id if check else "", lowest, count]
        replies = await self._slot_calls(label, every_bucket("page", store_id, argv=lambda b: argv))
        self._raise_any(store_id, replies)
        if any(reply[0] == 0 for reply in replies):
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)
        return [[_text(key) for key in reply[1:]] for reply in replies]

    # -- records ------------------------------------------------------------

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        groups = buckets((i, r.store_id, r.key) for i, r in enumerate(reads))
        calls = read_calls(reads, groups, uuid.uuid4().hex, self._ttl())
        waits = self._waits("claimed on") if any(r.claim for r in reads) else None
        replies = await self._slot_calls(self._label({r.store_id for r in reads}), calls, waits)
        found: list[StoredRecord | StorageError | None] = [None] * len(reads)
        for members, reply in zip(groups.values(), replies, strict=True):
            for n, i in enumerate(members):
                found[i] = self._found(reads[i], reply, n)
        return found

    def _found(self, r: RecordRead, reply: Any, n: int) -> StoredRecord | StorageError | None:
        """The answer to the `n`th read of one slot's call (NotDurableError: a claim its master
        could not confirm; loading again claims again)."""
        if isinstance(reply, BaseException):
            return self._failed(r.store_id, reply)
        short, reply = (reply, reply.reply) if isinstance(reply, Unconfirmed) else (None, reply)
        present, value, ctype, version, updated = reply[1 + 5 * n : 6 + 5 * n]
        if present == -1:
            return self._gone(r.store_id)
        if not present:
            return None
        if short is not None and r.claim:
            store = self._label([r.store_id])
            return NotDurableError(short.message, store=store, key=r.key, acknowledged=short.acknowledged)
        if present == 2:  # a record with deltas: its pieces, as one chain
            value, ctype = chain_of(value), CHAIN_CONTENT_TYPE
        return StoredRecord(r.key, value, _text(ctype), int(version), _time(updated))

    async def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
        outcomes: list[WriteOutcome | StorageError] = []
        for run in split_by_size(ops, lambda w: 0 if isinstance(w, RecordDelete) else len(w.value)):
            outcomes += await self._write_run(run)
        return outcomes

    async def _write_run(self, ops: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
        """Apply writes, deletes and appends: one atomic script call per slot, all slots at once."""
        groups = buckets((i, w.store_id, w.key) for i, w in enumerate(ops))
        calls = write_calls(ops, groups, uuid.uuid4().hex, self._ttl(), time.time_ns() // 1000)
        label = self._label({w.store_id for w in ops})
        replies = await self._slot_calls(label, calls, self._waits("written to"))
        outcomes: list[WriteOutcome | StorageError] = [WriteOutcome(False, 0)] * len(ops)
        for members, reply in zip(groups.values(), replies, strict=True):
            for n, i in enumerate(members):
                outcomes[i] = self._outcome(ops[i], reply, n)
        return outcomes

    def _outcome(self, w: WriteOp, reply: Any, n: int) -> WriteOutcome | StorageError:
        """The answer to the `n`th request of one slot's call (NotDurableError: applied, and
        its master could not confirm it)."""
        if isinstance(reply, BaseException):
            return self._failed(w.store_id, reply)
        short, reply = (reply, reply.reply) if isinstance(reply, Unconfirmed) else (None, reply)
        if reply[1 + 2 * n] == -1:
            return self._gone(w.store_id)
        outcome = WriteOutcome(applied=bool(reply[1 + 2 * n]), version=int(reply[2 + 2 * n]))
        if short is None or not outcome.applied:
            return outcome
        store = self._label([w.store_id])
        return NotDurableError(
            short.message, store=store, key=w.key, outcome=outcome, acknowledged=short.acknowledged
        )

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        # Each bucket's keys come in byte order of UTF-8, which is code point order: merged,
        # the first `limit` are the page; their metadata is then read per bucket.
        lowest = "-" if exclusive_start_key is None else "(" + exclusive_start_key
        merged = heapq.merge(*await self._pages(store_id, lowest, -1 if limit is None else limit))
        chosen = list(merged if limit is None else itertools.islice(merged, limit))
        if not chosen:
            return []
        groups = buckets((i, store_id, key) for i, key in enumerate(chosen))
        calls = [
            SlotCall(
                "meta",
                [live_key(store_id, b)] + [record_prefix(store_id, b) + chosen[i] for i in members],
                [store_id],
            )
            for (_, b), members in groups.items()
        ]
        replies = await self._slot_calls(self._label([store_id]), calls)
        self._raise_any(store_id, replies)
        if any(reply[0] == 0 for reply in replies):
            raise StoreNotFoundError("no such store (was it dropped?)", store=self._label([store_id]))
        found: list[RecordInfo | None] = [None] * len(chosen)
        for members, reply in zip(groups.values(), replies, strict=True):
            for n, i in enumerate(members):
                present, size, ctype, version, updated = reply[1 + 5 * n : 6 + 5 * n]
                if present:  # else deleted since its key was read
                    found[i] = RecordInfo(chosen[i], int(size), _text(ctype), int(version), _time(updated))
        return [info for info in found if info is not None]

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        label, b = self._label([store_id]), bucket_of(key)
        call = SlotCall("history", [live_key(store_id, b), history_prefix(store_id, b) + key], [store_id])
        (reply,) = await self._slot_calls(label, [call])
        self._raise_any(store_id, [reply])
        if reply[0] == 0:
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)
        kept = []
        for entry in reply[1:]:
            version, updated, ctlen, rest = entry.split(b" ", 3)
            size = int(ctlen)
            kept.append(StoredRecord(key, rest[size:], _text(rest[:size]), int(version), _time(updated)))
        return kept

    async def describe_durability(self) -> Durability:
        """Every master's persistence settings and replicas as it reports them now, and the options."""
        facts = await self._run(None, master_facts)
        return describe_cluster(facts, self.durability_options)

    def after_fork_in_child(self) -> None:
        """Locks and a client of its own: the first call reads the slot map again (see _forks.py).

        The parent's client may hold its locks (a slot map being read) and its sockets
        are the parent's: the child keeps it, unused and never closed, for good (closing
        it takes those locks), and connects a client of its own.
        """
        self._lock = threading.Lock()
        if self._client is not None:
            setattr(self._client, "close", _never)  # noqa: B010 (collected at exit: not closed either)
            self._inherited.append(self._client)
            self._client = None
        self._calls = SlotCaller(_SCRIPTS)
        self._registry_scripts = {}

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._client is not None:
                    self._client.close()
                    self._client = None

        await anyio.to_thread.run_sync(close)
