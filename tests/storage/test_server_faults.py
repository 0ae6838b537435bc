"""Redis and PostgreSQL backends when their server dies: retries, budgets, and no lost writes.

These tests kill their own servers (SIGKILL, as a crash would) and start them
again on the same port and data directory, so they use private servers, not
the session's shared ones.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from recoverable_state import StorageUnavailableError
from recoverable_state.storage import KeyValueStore, StorageBackend, WriteOutcome
from recoverable_state.storage._postgres import PostgresBackend
from recoverable_state.storage._redis import RedisBackend
from servers import (
    PostgresServer,
    RedisServer,
    flush_postgres,
    flush_redis,
    free_port,
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


async def test_write_while_down_succeeds_once_restarted(
    server: Server, make_backend: MakeBackend
) -> None:
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


async def test_write_fails_once_the_retry_budget_passes(
    server: Server, make_backend: MakeBackend
) -> None:
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


@pytest.mark.parametrize(
    ("cls", "url"),
    [
        (RedisBackend, "redis://:s3cret@127.0.0.1:{port}/0"),
        (RedisBackend, "redis://admin:s3cret@127.0.0.1:{port}/0"),
        (PostgresBackend, "postgresql://postgres:s3cret@127.0.0.1:{port}/db"),
        (PostgresBackend, "postgresql://postgres@127.0.0.1:{port}/db?password=s3cret"),
    ],
    ids=["redis-no-user", "redis-user", "postgres-userinfo", "postgres-query"],
)
async def test_unreachable_server_error_hides_the_password(
    cls: type[RedisBackend] | type[PostgresBackend], url: str
) -> None:
    port = free_port()  # nothing listens there
    backend = cls(url.format(port=port), retry_timeout=0.3)
    try:
        assert "s3cret" not in backend.url
        assert f"127.0.0.1:{port}" in backend.url
        with pytest.raises(StorageUnavailableError) as caught:
            await KeyValueStore.open(name="nowhere", storage=backend)
        assert "s3cret" not in str(caught.value)
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert "nowhere" in str(caught.value)
    finally:
        await backend.aclose()


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
