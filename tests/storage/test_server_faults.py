"""Redis and PostgreSQL backends when their server dies, goes silent or refuses us.

These tests kill their own servers (SIGKILL, as a crash would) and start them
again on the same port and data directory, so they use private servers, not
the session's shared ones. A server that goes silent is played by a TCP port
that accepts connections and never replies, or by a proxy that stops passing
bytes on; a wrong password, by private servers that require one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from recoverable_state import StorageUnavailableError
from recoverable_state.storage import KeyValueStore, StorageBackend, WriteOutcome, open_backend
from recoverable_state.storage._postgres import PostgresBackend
from recoverable_state.storage._redis import RedisBackend
from servers import (
    PG_DATABASE,
    PostgresServer,
    RedisServer,
    flush_postgres,
    flush_redis,
    start_or_skip,
)

pytestmark = pytest.mark.anyio

BYTES = "application/octet-stream"

Server = RedisServer | PostgresServer
MakeBackend = Callable[..., StorageBackend]


@pytest.fixture(scope="module")
def private_redis(server_dir: Path) -> Iterator[RedisServer]:
    server = start_or_skip(lambda: RedisServer(server_dir / "faults-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def private_postgres(server_dir: Path) -> Iterator[PostgresServer]:
    server = start_or_skip(lambda: PostgresServer(server_dir / "faults-postgres"))
    yield server
    server.stop()


@pytest.fixture(params=["redis", "postgresql"])
def server(request: pytest.FixtureRequest) -> Server:
    """A private server of each kind, running and empty."""
    found: Server
    if request.param == "redis":
        found = request.getfixturevalue("private_redis")
        if found.proc is None or found.proc.poll() is not None:
            found.start()
        flush_redis(found.url)
    else:
        found = request.getfixturevalue("private_postgres")
        if found.proc is None or found.proc.poll() is not None:
            found.start()
        flush_postgres(found.url)
    return found


@pytest.fixture
async def make_backend(server: Server) -> AsyncIterator[MakeBackend]:
    """Build backends on the private server (closed after the test)."""
    made: list[StorageBackend] = []

    def make(*, retry_timeout: float = 10.0) -> StorageBackend:
        cls = RedisBackend if isinstance(server, RedisServer) else PostgresBackend
        backend = cls(server.url, retry_timeout=retry_timeout)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


async def test_write_while_down_succeeds_once_restarted(server: Server, make_backend: MakeBackend) -> None:
    kvs = await KeyValueStore.open(name="faults", storage=make_backend(retry_timeout=20))
    await kvs.put_record("before", b"written before", BYTES, keep_history=2)

    server.kill()
    outcome: list[WriteOutcome] = []

    async def write() -> None:
        outcome.append(await kvs.put_record("during", b"written while down", BYTES))

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        await anyio.sleep(0.6)
        assert outcome == []  # still retrying
        await anyio.to_thread.run_sync(server.start)

    assert outcome == [WriteOutcome(applied=True, version=1)]
    assert await kvs.get_value("during") == b"written while down"
    before = await kvs.get_record("before")
    assert before is not None
    assert (before.value, before.version) == (b"written before", 1)
    assert [h.value for h in await kvs.get_history("before")] == [b"written before"]


async def test_write_fails_once_the_retry_budget_passes(server: Server, make_backend: MakeBackend) -> None:
    kvs = await KeyValueStore.open(name="doomed-writes", storage=make_backend(retry_timeout=0.6))
    await kvs.set_value("before", {"kept": True})

    server.kill()
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as caught:
        await kvs.set_value("during", {"lost": True})
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 4.0
    message = str(caught.value)
    assert f"127.0.0.1:{server.port}" in message
    assert "doomed-writes" in message
    assert caught.value.store == "doomed-writes"
    with pytest.raises(StorageUnavailableError):
        await kvs.get_value("before")

    await anyio.to_thread.run_sync(server.start)
    assert await kvs.get_value("before") == {"kept": True}
    assert await kvs.get_value("during") is None  # never applied
    await kvs.set_value("after", 1)  # the same backend works again
    assert [i.key for i in await kvs.list_keys()] == ["after", "before"]


async def test_crashes_during_persistence_lose_and_repeat_nothing(
    server: Server, make_backend: MakeBackend
) -> None:
    """Rounds of batched writes while the server is killed twice: each applied exactly once."""
    kvs = await KeyValueStore.open(name="busy", storage=make_backend(retry_timeout=20))
    rounds, keys = 24, 40
    progress = [anyio.Event() for _ in range(rounds + 1)]
    outcomes: dict[tuple[int, int], WriteOutcome] = {}

    async def put(r: int, k: int) -> None:
        value = f"round {r} key {k} ".encode() * 50
        outcomes[(r, k)] = await kvs.put_record(f"k{k}", value, BYTES, keep_history=3)

    async def writer() -> None:
        for r in range(rounds):
            async with anyio.create_task_group() as tg:
                for k in range(keys):
                    tg.start_soon(put, r, k)
            progress[r + 1].set()
            await anyio.sleep(0.01)

    async def crasher() -> None:
        for after in (4, 12):
            await progress[after].wait()
            server.kill()
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(server.start)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        tg.start_soon(crasher)

    for (r, _), outcome in outcomes.items():
        assert outcome == WriteOutcome(applied=True, version=r + 1)
    for k in range(keys):
        record = await kvs.get_record(f"k{k}")
        assert record is not None
        assert record.version == rounds
        assert record.value == f"round {rounds - 1} key {k} ".encode() * 50
        history = await kvs.get_history(f"k{k}")
        assert [h.version for h in history] == [rounds, rounds - 1, rounds - 2]


async def test_claim_fences_the_former_owner(make_backend: MakeBackend) -> None:
    """Two backend instances (two processes): after B claims, A's CAS write is refused."""
    a = await KeyValueStore.open(name="fenced", storage=make_backend())
    b = await KeyValueStore.open(name="fenced", storage=make_backend())
    assert a.id == b.id

    await a.put_record("state", b"A's snapshot", BYTES)
    held_by_a = await a.get_record("state", claim=True)
    assert held_by_a is not None
    assert held_by_a.version == 2

    taken_by_b = await b.get_record("state", claim=True)
    assert taken_by_b is not None
    assert (taken_by_b.value, taken_by_b.version) == (b"A's snapshot", 3)
    assert await b.put_record("state", b"B's snapshot", BYTES, expected_version=3) == (
        WriteOutcome(applied=True, version=4)
    )

    stale = await a.put_record("state", b"A's stale snapshot", BYTES, expected_version=2)
    assert stale == WriteOutcome(applied=False, version=4)
    assert not await a.delete_record("state", expected_version=2)
    assert await a.get_value("state") == b"B's snapshot"
    assert await b.get_value("state") == b"B's snapshot"


# -- a reply lost after the server applied a batch ------------------------------


async def test_redis_batch_whose_reply_was_lost_is_not_applied_twice(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.exceptions

    flush_redis(redis_url)
    lost = [0]
    script = RedisBackend._script

    def lose_first_reply(
        self: RedisBackend, name: str, keys: Sequence[str], args: Sequence[object]
    ) -> object:
        result = script(self, name, keys, args)  # the server applies the batch...
        if name == "write" and lost[0] < 2:
            lost[0] += 1
            raise redis.exceptions.ConnectionError("connection lost")  # ...and the reply is lost
        return result

    monkeypatch.setattr(RedisBackend, "_script", lose_first_reply)
    backend = RedisBackend(redis_url, retry_timeout=5)
    try:
        await check_applied_once(backend)
    finally:
        await backend.aclose()
    assert lost[0] == 2


async def test_postgres_commit_whose_reply_was_lost(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT sent, reply lost: committed or not, the retry finds out and applies once."""
    import psycopg

    flush_postgres(postgres_url)
    plan: list[str] = []
    commit = psycopg.Connection.commit

    def flaky_commit(self: psycopg.Connection[object]) -> None:
        step = plan.pop(0) if plan else "commit"
        if step == "commit-then-lose":
            commit(self)
        if step != "commit":
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        commit(self)

    monkeypatch.setattr(psycopg.Connection, "commit", flaky_commit)
    backend = PostgresBackend(postgres_url, retry_timeout=5)
    try:
        kvs = await KeyValueStore.open(name="lost-replies", storage=backend)
        plan[:] = ["commit-then-lose"]
        await check_applied_once(backend, kvs)
        plan[:] = ["lose-before-commit"]
        assert await kvs.put_record("k", b"v3", BYTES, expected_version=2) == WriteOutcome(True, 3)
        plan[:] = ["commit-then-lose"]
        claimed = await kvs.get_record("k", claim=True)
        assert claimed is not None
        assert claimed.version == 4
        plan[:] = ["commit-then-lose"]
        assert await kvs.delete_record("k", expected_version=4)
        assert await kvs.get_record("k") is None
        assert plan == []
    finally:
        await backend.aclose()


async def check_applied_once(backend: StorageBackend, kvs: KeyValueStore | None = None) -> None:
    """An unconditional then a CAS write whose first replies are lost: each applied once."""
    kvs = kvs or await KeyValueStore.open(name="lost-replies", storage=backend)
    assert await kvs.put_record("k", b"v1", BYTES, keep_history=5) == WriteOutcome(True, 1)
    assert await kvs.put_record("k", b"v2", BYTES, expected_version=1, keep_history=5) == (
        WriteOutcome(True, 2)
    )
    record = await kvs.get_record("k")
    assert record is not None
    assert (record.value, record.version) == (b"v2", 2)
    assert [h.version for h in await kvs.get_history("k")] == [2, 1]


# -- a server that takes connections and never answers --------------------------

SECRET = "s3cret-Pw"
"""The password of the private servers that require one."""

SLACK = 3.0
"""Seconds past a budget a failure may take on a loaded machine (the bug was 30 s, or forever)."""


class BlackHole:
    """A TCP port on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                self.accepted.append(conn)  # held open, never read or answered

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


class Proxy:
    """Passes a loopback port through to a server until `silence()`, then passes nothing on.

    A silenced connection stays open but its bytes go nowhere, as with a server
    that hangs mid-session. `speak()` lets connections made afterwards through again.
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._silent = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self._silent.set()

    def speak(self) -> None:
        self._silent.clear()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self._target))
                self._sockets += [client, upstream]
                muted = threading.Event()  # this connection's, once the proxy fell silent
                for src, dst in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(src, dst, muted), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, muted: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self._silent.is_set():
                    muted.set()
                if not muted.is_set():
                    dst.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def _url(kind: str, port: int, user: str = "postgres", password: str | None = None) -> str:
    auth = f":{password}@" if password else "@"
    if kind == "redis":
        return f"redis://{auth if password else ''}127.0.0.1:{port}/0"
    return f"postgresql://{user}{auth}127.0.0.1:{port}/{PG_DATABASE}"


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_server_that_never_answers_fails_within_the_budget(kind: str, black_hole: BlackHole) -> None:
    backend = open_backend(_url(kind, black_hole.port, password=SECRET), retry_timeout=2)
    try:
        started = time.monotonic()
        with anyio.fail_after(20), pytest.raises(StorageUnavailableError) as caught:
            await KeyValueStore.open(name="silent", storage=backend)
        elapsed = time.monotonic() - started
    finally:
        await backend.aclose()
    assert elapsed < 2 + SLACK
    assert black_hole.accepted  # it was reachable: it took the connection
    message = str(caught.value)
    assert "did not answer within 2 s" in message
    assert "unreachable" not in message
    assert f"127.0.0.1:{black_hole.port}" in message
    assert caught.value.store == "silent"
    assert SECRET not in message


@pytest.fixture
def proxied(server: Server) -> Iterator[tuple[Proxy, str]]:
    """A proxy in front of the private server, and the URL that goes through it."""
    proxy = Proxy(server.port)
    kind = "redis" if isinstance(server, RedisServer) else "postgresql"
    yield proxy, _url(kind, proxy.port)
    proxy.close()


async def test_server_silent_mid_session_fails_within_the_budget_and_frees_the_connection(
    proxied: tuple[Proxy, str],
) -> None:
    """A connection that goes quiet after working: the call ends in time, the worker thread too.

    With one pooled connection, the write after the silence can only succeed if
    the thread stuck on the silent connection ended and gave its slot back.
    """
    proxy, url = proxied
    backend = open_backend(url, retry_timeout=2, pool_size=1)
    try:
        kvs = await KeyValueStore.open(name="goes-quiet", storage=backend)
        await kvs.put_record("k", b"v1", BYTES)

        proxy.silence()
        started = time.monotonic()
        with anyio.fail_after(20), pytest.raises(StorageUnavailableError) as caught:
            await kvs.put_record("k", b"v2", BYTES)
        assert time.monotonic() - started < 2 + SLACK
        assert "did not answer within 2 s" in str(caught.value)
        assert caught.value.store == "goes-quiet"

        proxy.speak()
        with anyio.fail_after(20):
            record = await kvs.get_record("k")
            assert record is not None
            outcome = await kvs.put_record("k", b"v3", BYTES, expected_version=record.version)
        assert outcome.applied
    finally:
        await backend.aclose()


async def test_cancelling_a_call_to_a_silent_postgres_frees_its_connection(
    private_postgres: PostgresServer,
) -> None:
    """libpq waits for a reply forever: a cancelled call must still end its worker thread.

    (A KeyValueStore sees an in-flight batch through, within the budget; the
    backend call itself gives way to cancellation.)
    """
    if private_postgres.proc is None or private_postgres.proc.poll() is not None:
        private_postgres.start()
    flush_postgres(private_postgres.url)
    proxy = Proxy(private_postgres.port)
    backend = open_backend(_url("postgresql", proxy.port), retry_timeout=60, pool_size=1)
    try:
        kvs = await KeyValueStore.open(name="cancelled", storage=backend)
        proxy.silence()
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await backend.list_stores()
        assert scope.cancelled_caught
        assert time.monotonic() - started < 0.5 + SLACK

        proxy.speak()
        with anyio.fail_after(20):  # the only connection slot is free again
            await kvs.put_record("k", b"written", BYTES)
            assert await kvs.get_value("k") == b"written"
    finally:
        await backend.aclose()
        proxy.close()
