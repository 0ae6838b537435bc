"""Redis backend (`redis://host:port/db`): every batch is one atomic Lua script call.

redis-py's asyncio client does not run on trio, so the sync client runs in anyio
worker threads over a blocking connection pool of `pool_size` connections.

Layout (all under the `rs:` prefix; a store id is 32 hex digits):

- `rs:stores`          hash: store id -> `=<name>` (or `-` for an unnamed store)
- `rs:names`           hash: store name -> store id
- `rs:k:<id>`          sorted set of the store's keys, all scored 0 (lexical order)
- `rs:r:<id>:<key>`    hash {value, content_type, version, updated_at}; the time
                       is in integer microseconds since the epoch; a record with
                       deltas also holds n (their count) and d<i>, c<i> (the i-th
                       delta and its content type), see `_redis_scripts.py`
- `rs:h:<id>:<key>`    list of kept snapshots, newest first, each packed as
                       `<version> <updated_at> <len(content_type)> <content_type><value>`
- `rs:batch:<uuid>`    the outcome of a mutating script call, kept for a short
                       while (see retries below)

Each `write_batch` is one EVALSHA (one per 64 MiB of values, as Redis blocks
every other client while a script runs; the scripts are `_redis_scripts.py`):
the script checks every store (a request to a dropped store is answered with
an error for that request alone), then applies each write's or delete's
compare-and-set in order, trims history, and returns the outcomes. Redis runs
a script atomically, so a reader sees each record whole, and a `read_batch`
with claims bumps versions in the same atomic step as the read.
Store creation by name is one script too (check-then-set inside Redis), so two
processes opening the same name get the same id. Keys are built inside the
scripts for listings, drops and purges, so this layout needs one server; a
Redis Cluster has its own (`_redis_cluster.py`, `redis+cluster://`).

Durability: a write returns once Redis has acknowledged it. Whether that reply
means "on disk" is the server's setting: with `appendonly yes` and
`appendfsync always` it does. With `appendfsync everysec` (the default) a crash
may lose the last second or two of acknowledged writes, even a crash of the
Redis process alone (Redis postpones writing its AOF while a background fsync
is slow); without the AOF, a crash loses everything since the last RDB
snapshot. Configure the server for the guarantee you need; the backend reads
those settings at open and warns once when an acknowledged write can be lost.
`wait_replicas=N` and `fsync=true` make each write batch wait for N replicas or
for the AOF fsync (`_redis_durability.py`); a batch they could not confirm
answers its applied writes with NotDurableError.

Budget: `retry_timeout` seconds bound every wait on the server (see
`_server.py`): waiting for a free pooled connection (the pool's `timeout`),
connecting (`socket_connect_timeout`, at most 5 s an attempt, so that a host
that drops packets is tried again), every reply (`socket_timeout`, which also
bounds a long script), and the retries in between. A worker thread the caller
stopped waiting for ends by these socket timeouts.

Retries: a refused or lost connection (reported as "unreachable") or a server
that took the connection but sent no reply ("did not answer within N s") is
retried with exponential backoff (50 ms doubling to 1 s) within the budget,
then raises StorageUnavailableError naming the server and the store. A wrong
password or user (WRONGPASS, NOAUTH) raises StorageAuthenticationError at
once, and any other error reply StorageError at once. A connection
may drop after Redis ran a script but before its reply arrived, so every
mutating call carries a unique batch id: the script stores its outcome under
`rs:batch:<id>` (expiring after the retry budget plus a minute) and a retried
call finds it and returns the first outcome instead of writing again. A write
is thus applied at most once, and reports what really happened. A retried
claim that had already run returns the records without claiming them twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from .._errors import NotDurableError, StorageError, StoreNotFoundError
from .._forks import watch_forks
from ._backend import (
    Durability,
    RecordAppend,
    RecordDelete,
    RecordInfo,
    RecordRead,
    StoredRecord,
    StoreInfo,
    WriteOp,
    WriteOutcome,
)
from ._contract import split_by_size
from ._redis_deltas import CHAIN_CONTENT_TYPE, chain_of
from ._redis_durability import (
    ServerFacts,
    WaitOptions,
    add_waits,
    check_at_open,
    describe,
    read_facts,
    shortfall,
    wait_ms,
    wait_options,
)
from ._redis_scripts import NAMES, PREFIX, SCRIPTS, STORES
from ._server import Failure, ServerBackend

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_CONNECT_TIMEOUT = 5.0
"""Seconds one connection attempt may take at most (less when the budget is shorter)."""


def _time(micros: bytes | int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(micros))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisBackend(ServerBackend):
    """Stores records in a Redis server; every batch is one atomic script call."""

    server_name = "Redis server"
    keeps_deltas = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        retry_timeout: float = 10.0,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        fsync: bool | None = None,
    ) -> None:
        super().__init__(url, pool_size=pool_size, retry_timeout=retry_timeout)
        self.durability_options: WaitOptions
        """What each write batch waits for (`wait_replicas`, `wait_timeout`, `fsync`)."""
        self.durability_options, self._dsn = wait_options(
            url, wait_replicas=wait_replicas, wait_timeout=wait_timeout, fsync=fsync
        )
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}
        self._facts: ServerFacts | None = None  # what the server said at open (checked once)
        watch_forks(self)

    # -- plumbing -----------------------------------------------------------

    def _connect(self) -> redis.Redis:
        """The client, built on first use (in a worker thread)."""
        with self._lock:
            if self._client is None:
                pool = redis.BlockingConnectionPool.from_url(
                    self._dsn,
                    max_connections=self.pool_size,
                    timeout=self._wait,
                    socket_connect_timeout=min(self._wait, _CONNECT_TIMEOUT),
                    socket_timeout=self._wait,
                    retry=Retry(NoBackoff(), 0),  # retries happen here, with our budget
                    decode_responses=False,
                )
                client = redis.Redis(connection_pool=pool)
                if self._facts is None:
                    try:  # at open: refuse what the server cannot honour, warn once
                        self._facts = check_at_open(client, self.url, self.durability_options)
                    except BaseException:
                        pool.disconnect()
                        raise
                for name, source in SCRIPTS.items():
                    self._scripts[name] = client.register_script(source)
                self._client = client
            return self._client

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self._connect()
        return self._scripts[name](keys=keys, args=args, client=client)

    async def _run(self, store: str | None, call: Callable[[], T]) -> T:
        """Run `call` in a worker thread, retrying connection errors within the budget.

        The socket timeouts end the thread by themselves, so nothing interrupts it.
        """
        return await self._retrying(
            store, lambda deadline: anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        )

    def _classify(self, exc: BaseException) -> Failure | None:
        if isinstance(exc, redis.exceptions.AuthenticationError):  # a ConnectionError too
            return Failure.AUTHENTICATION
        if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
            return Failure.SILENT
        if isinstance(exc, redis.exceptions.ConnectionError | OSError):
            return Failure.UNREACHABLE
        if isinstance(exc, redis.exceptions.RedisError):
            return Failure.FAILED
        return None

    def _marker(self) -> tuple[str, int]:
        """A fresh batch marker key and how long (ms) it outlives the retry budget."""
        return f"{PREFIX}batch:{uuid.uuid4().hex}", int((self.retry_timeout + 60) * 1000)

    @staticmethod
    def _record_key(store_id: str, key: str) -> str:
        return f"{PREFIX}r:{store_id}:{key}"

    @staticmethod
    def _history_key(store_id: str, key: str) -> str:
        return f"{PREFIX}h:{store_id}:{key}"

    @staticmethod
    def _index_key(store_id: str) -> str:
        return f"{PREFIX}k:{store_id}"

    # -- stores -------------------------------------------------------------

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find() -> StoreInfo:
            client = self._connect()
            if id is not None:
                found = client.hget(STORES, id)
                if found is None:
                    raise StoreNotFoundError(f"no store has this id in {self.url}", store=id)
                raw = _text(found)
                return StoreInfo(id, raw[1:] if raw.startswith("=") else None)
            new_id = uuid.uuid4().hex
            if name is None:
                client.hset(STORES, new_id, "-")
                return StoreInfo(new_id, None)
            return StoreInfo(_text(self._script("open", [NAMES, STORES], [name, new_id])), name)

        info = await self._run(name if id is None else id, find)
        self._labels[info.id] = info.label
        return info

    async def list_stores(self) -> list[StoreInfo]:
        def rows() -> list[StoreInfo]:
            found: dict[bytes, bytes] = self._connect().hgetall(STORES)  # type: ignore[assignment]
            return [
                StoreInfo(_text(i), _text(n)[1:] if n.startswith(b"=") else None) for i, n in found.items()
            ]

        stores = await self._run(None, rows)
        return sorted(stores, key=lambda s: (s.name or "", s.id))

    async def drop_store(self, store_id: str) -> None:
        def drop() -> None:
            self._script(
                "drop",
                [NAMES, STORES, self._index_key(store_id)],
                [store_id, self._record_key(store_id, ""), self._history_key(store_id, "")],
            )

        await self._run(self._label([store_id]), drop)

    # -- records ------------------------------------------------------------

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        marker, ttl = self._marker()
        keys = [marker, STORES] + [self._record_key(r.store_id, r.key) for r in reads]
        args: list[Any] = [ttl if any(r.claim for r in reads) else 0]
        for r in reads:
            args += [r.store_id, "1" if r.claim else "0"]
        label = self._label({r.store_id for r in reads})
        if args[0] and self.durability_options.waits:  # claims bump versions: fencing needs them kept
            reply, short = await self._run(
                label, lambda: self._waiting("read", keys, args, ttl, "claimed on")
            )
            self._claims_durable(reads, reply, label, short)
        else:
            reply = await self._run(label, lambda: self._script("read", keys, args))
        found: list[StoredRecord | StorageError | None] = []
        for i, r in enumerate(reads):
            present, value, ctype, version, updated = reply[1 + 5 * i : 6 + 5 * i]
            if present == -1:  # that read alone fails; the batch goes on
                found.append(self._gone(r.store_id))
                continue
            if not present:
                found.append(None)
                continue
            if present == 2:  # a record with deltas: its pieces, as one chain
                value, ctype = chain_of(value), CHAIN_CONTENT_TYPE
            found.append(StoredRecord(r.key, value, _text(ctype), int(version), _time(updated)))
        return found

    async def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
        outcomes: list[WriteOutcome | StorageError] = []
        for run in split_by_size(ops, lambda w: 0 if isinstance(w, RecordDelete) else len(w.value)):
            outcomes += await self._write_run(run)
        return outcomes

    async def _write_run(self, ops: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
        """Apply writes, deletes and appends in one atomic script call."""
        marker, ttl = self._marker()
        now = time.time_ns() // 1000
        keys = [marker, STORES]
        args: list[Any] = [ttl, now]
        for w in ops:
            keys += [
                self._record_key(w.store_id, w.key),
                self._history_key(w.store_id, w.key),
                self._index_key(w.store_id),
            ]
            expected = "" if w.expected_version is None else w.expected_version
            if isinstance(w, RecordDelete):
                args += [w.store_id, w.key, expected, "d", "", ""]
                continue
            value = w.value if isinstance(w.value, bytes) else bytes(w.value)
            keep = "a" if isinstance(w, RecordAppend) else max(w.keep_history, 0)
            args += [w.store_id, w.key, expected, keep, w.content_type, value]
        label = self._label({w.store_id for w in ops})
        if self.durability_options.waits:
            reply, short = await self._run(
                label, lambda: self._waiting("write", keys, args, ttl, "written to")
            )
        else:
            reply, short = await self._run(label, lambda: self._script("write", keys, args)), None
        outcomes: list[WriteOutcome | StorageError] = [
            self._gone(w.store_id)  # that request alone fails; the batch goes on
            if reply[1 + 2 * i] == -1
            else WriteOutcome(applied=bool(reply[1 + 2 * i]), version=int(reply[2 + 2 * i]))
            for i, w in enumerate(ops)
        ]
        if short is None:
            return outcomes
        return [
            NotDurableError(
                short[0], store=self._label([w.store_id]), key=w.key, outcome=o, acknowledged=short[1]
            )
            if isinstance(o, WriteOutcome) and o.applied
            else o
            for w, o in zip(ops, outcomes, strict=True)
        ]

    def _claims_durable(
        self, reads: Sequence[RecordRead], reply: Any, label: str, short: tuple[str, int | None] | None
    ) -> None:
        """Raise NotDurableError when claims that bumped a record were not confirmed as asked.

        The whole batch fails (its records are not handed out): a state then fails to
        load, and loading it again claims it again.
        """
        if short is None:
            return
        claimed = [r.key for i, r in enumerate(reads) if r.claim and reply[1 + 5 * i] not in (0, -1)]
        if claimed:
            keys = ", ".join(map(repr, claimed[:3])) + (
                f" and {len(claimed) - 3} more" if len(claimed) > 3 else ""
            )
            raise NotDurableError(f"{short[0]} (claims of keys {keys})", store=label, acknowledged=short[1])

    def _waiting(
        self, script: str, keys: list[str], args: list[Any], ttl: int, did: str
    ) -> tuple[Any, tuple[str, int | None] | None]:
        """A mutating script, then WAIT / WAITAOF on the same connection; what fell short, if anything.

        WAIT counts the replicas that acknowledged this connection's last write. A
        retried call whose first attempt ran replays its outcome without writing, on
        a connection that may have written nothing: so the batch's marker is touched
        (PEXPIRE, which replicates) after the script, every time, and waited for.
        """
        options = self.durability_options
        ms = wait_ms(options, self._wait)
        with self._connect().pipeline(transaction=False) as pipe:
            self._scripts[script](keys=keys, args=args, client=pipe)
            pipe.pexpire(keys[0], ttl)
            add_waits(pipe, options, ms)
            replies = pipe.execute()
        return replies[0], shortfall(replies[2:], options, ms, f"{did} Redis server {self.url}")

    def _gone(self, store_id: str) -> StorageError:
        return StoreNotFoundError("no such store (was it dropped?)", store=self._label([store_id]))

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        # The index is a sorted set scored 0: ZRANGEBYLEX walks it in byte order,
        # which for UTF-8 is code point order.
        label = self._label([store_id])
        keys = [STORES, self._index_key(store_id)]
        lowest = "-" if exclusive_start_key is None else "(" + exclusive_start_key
        args = [store_id, self._record_key(store_id, ""), lowest, -1 if limit is None else limit]
        reply = await self._run(label, lambda: self._script("list", keys, args))
        if reply[0] == 0:
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)
        return [
            RecordInfo(_text(k), int(size), _text(ctype), int(version), _time(updated))
            for k, size, ctype, version, updated in (reply[i : i + 5] for i in range(1, len(reply), 5))
        ]

    async def purge_store(self, store_id: str) -> None:
        label = self._label([store_id])
        keys = [STORES, self._index_key(store_id)]
        args = [store_id, self._record_key(store_id, ""), self._history_key(store_id, "")]
        if not await self._run(label, lambda: self._script("purge", keys, args)):
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        label = self._label([store_id])

        def history() -> tuple[bool, list[bytes]]:
            client = self._connect()
            with client.pipeline(transaction=True) as pipe:
                pipe.hexists(STORES, store_id)
                pipe.lrange(self._history_key(store_id, key), 0, -1)
                exists, entries = pipe.execute()
            return bool(exists), list(entries)

        exists, entries = await self._run(label, history)
        if not exists:
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)
        kept = []
        for entry in entries:
            version, updated, ctlen, rest = entry.split(b" ", 3)
            size = int(ctlen)
            kept.append(StoredRecord(key, rest[size:], _text(rest[:size]), int(version), _time(updated)))
        return kept

    async def describe_durability(self) -> Durability:
        """The server's persistence settings and replicas as it reports them now, with this URL's options."""
        facts = await self._run(None, lambda: read_facts(self._connect()))
        return describe(facts, self.durability_options)

    def after_fork_in_child(self) -> None:
        """A lock and a client of its own: the first call connects this process (see _forks.py).

        The parent may have been connecting (holding the lock) when it forked, and its
        sockets are its own: the child only drops its references to them (redis-py
        closes a connection made in another process without a word to the server).
        """
        self._lock = threading.Lock()
        self._client = None
        self._scripts = {}

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._client is not None:
                    self._client.close()
                    self._client.connection_pool.disconnect()
                    self._client = None

        await anyio.to_thread.run_sync(close)
