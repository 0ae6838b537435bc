"""Redis durability you choose and see: `wait_replicas`, `fsync`, the warning at open, the ACL.

Real servers: a primary with one replica (`REPLICAOF`) of this module's own, a
server without AOF, a server with ACL users; both loops. A persist whose batch
fewer replicas acknowledged than asked fails with NotDurableError naming store,
key and count, and the state is written again by the next persist, once the
replica is back; the replica then holds it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from recoverable_state import (
    KeyValueStore,
    NotDurableError,
    RecoverableState,
    StorageError,
    service_locator,
)
from recoverable_state.storage import open_backend
from recoverable_state.testing import BackendConformance
from recoverable_state.testing.conformance import MakeBackend
from servers import RedisServer, start_or_skip

pytestmark = pytest.mark.anyio


class Progress(BaseModel):
    done: int = 0


def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _follow(replica: RedisServer, primary: RedisServer) -> None:
    """Make `replica` replicate `primary` and wait until the link is up and the primary sees it."""
    client = redis.Redis(port=replica.port, decode_responses=True)
    main = redis.Redis(port=primary.port, decode_responses=True)
    try:
        client.replicaof("127.0.0.1", primary.port)
        _until(lambda: client.info("replication").get("master_link_status") == "up")
        _until(lambda: main.info("replication").get("slave0", {}).get("state") == "online")
    finally:
        client.close()
        main.close()


@pytest.fixture(scope="module")
def pair(server_dir: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica, this module's own."""
    primary = start_or_skip(lambda: RedisServer(server_dir / "durability-primary"))
    replica = start_or_skip(lambda: RedisServer(server_dir / "durability-replica"))
    _follow(replica, primary)
    yield primary, replica
    replica.stop()
    primary.stop()


@pytest.fixture
def primary(pair: tuple[RedisServer, RedisServer]) -> RedisServer:
    server, replica = pair
    if replica.proc is None or replica.proc.poll() is not None:
        replica.start()
        _follow(replica, server)
    client = redis.Redis(port=server.port)
    client.flushall()
    client.close()
    return server


class TestWaitingForAReplica(BackendConformance):
    """The whole contract holds with every write batch pipelined with its WAIT."""

    machine_examples = 8  # the same backend without WAIT (test_conformance.py) runs the full 20

    @pytest.fixture
    def make_backend(self, primary: RedisServer) -> MakeBackend:
        return lambda: open_backend(primary.url + "?wait_replicas=1&wait_timeout=5")


async def _state(url: str) -> RecoverableState[Progress]:
    backend = open_backend(url)
    service_locator.set_storage(backend)
    state = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled="explicit_only"
    )
    await state.initialize()
    return state


def _held_by(server: RedisServer, store_id: str) -> dict[bytes, bytes]:
    client = redis.Redis(port=server.port)
    try:
        found: dict[bytes, bytes] = client.hgetall(f"rs:r:{store_id}:p")  # type: ignore[assignment]
        return found
    finally:
        client.close()


async def test_wait_replicas_returns_once_the_replica_holds_the_write(
    primary: RedisServer, pair: tuple[RedisServer, RedisServer]
) -> None:
    state = await _state(primary.url + "?wait_replicas=1&wait_timeout=2")
    store = await KeyValueStore.open()
    state.current_value.done = 7
    await state.persist_state()
    held = _held_by(pair[1], store.id)  # at once: WAIT said the replica has it
    assert b'"done":7' in held[b"value"]
    await state.teardown()


async def test_more_replicas_asked_than_there_are_is_not_durable(primary: RedisServer) -> None:
    state = await _state(primary.url + "?wait_replicas=2&wait_timeout=0.2")
    state.current_value.done = 1
    with pytest.raises(NotDurableError) as caught:
        await state.persist_state()
    error = caught.value
    assert error.store == "default"
    assert error.key == "p"
    assert error.acknowledged == 1
    assert error.outcome == (True, 1)  # applied on the primary: version 1 is stored
    assert "1 of 2 replica(s) acknowledged it within 0.2 s (wait_replicas=2)" in str(error)


async def test_a_claim_is_waited_for_too(primary: RedisServer, pair: tuple[RedisServer, RedisServer]) -> None:
    state = await _state(primary.url + "?wait_replicas=1&wait_timeout=2")
    store = await KeyValueStore.open()
    state.current_value.done = 1
    await state.persist_state()
    await state.teardown()
    again = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled="explicit_only"
    )
    assert (await again.initialize()).done == 1
    assert _held_by(pair[1], store.id)[b"version"] == b"2"  # the claim's bump, on the replica already
    await again.teardown()


async def test_a_claim_not_confirmed_fails_the_load(primary: RedisServer) -> None:
    state = await _state(primary.url + "?wait_replicas=2&wait_timeout=0.2")  # absent: nothing claimed
    state.current_value.done = 1
    with pytest.raises(NotDurableError):
        await state.persist_state()
    with pytest.raises(NotDurableError):  # its last persist writes it again: still one replica short
        await state.teardown()
    again = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled="explicit_only"
    )
    with pytest.raises(NotDurableError, match=r"store 'default': claimed on .* 1 of 2 replica.* keys 'p'"):
        await again.initialize()


async def test_a_reset_not_confirmed_durable_is_a_reset_all_the_same(
    primary: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    state = await _state(primary.url + "?wait_replicas=2&wait_timeout=0.2")
    store = await KeyValueStore.open()
    state.current_value.done = 3
    with pytest.raises(NotDurableError):
        await state.persist_state()
    with pytest.raises(NotDurableError, match=r"key 'p': .* 1 of 2 replica"):
        await state.reset()
    assert _held_by(primary, store.id) == {}  # deleted on the primary
    state.current_value.done = 4
    with (
        caplog.at_level(logging.WARNING, logger="recoverable_state"),
        pytest.raises(NotDurableError) as caught,
    ):
        await state.persist_state()
    assert caught.value.outcome == (True, 1)  # written afresh, not as a store that went back
    assert not [r for r in caplog.records if "older than version" in r.getMessage()]


async def test_a_persist_the_stopped_replica_missed_is_written_again_when_it_is_back(
    primary: RedisServer, pair: tuple[RedisServer, RedisServer]
) -> None:
    replica = pair[1]
    state = await _state(primary.url + "?wait_replicas=1&wait_timeout=1")
    store = await KeyValueStore.open()
    state.current_value.done = 1
    await state.persist_state()
    replica.stop()
    main = redis.Redis(port=primary.port, decode_responses=True)
    _until(lambda: main.info("replication").get("connected_slaves") == 0)
    main.close()
    state.current_value.done = 2
    with pytest.raises(NotDurableError, match=r"store 'default', key 'p': .* 0 of 1 replica"):
        await state.persist_state()
    replica.start()
    _follow(replica, primary)
    await state.persist_state()  # no change since, but not confirmed: written again, and waited for
    held = _held_by(replica, store.id)
    assert b'"done":2' in held[b"value"]
    assert held[b"version"] == b"3"  # 1, 2 (not durable), 3 (written again, acknowledged)
    await state.persist_state()  # now synced: nothing is written
    assert _held_by(primary, store.id)[b"version"] == b"3"
    await state.teardown()


@pytest.fixture(scope="module")
def plain_redis(server_dir: Path) -> Iterator[RedisServer]:
    """A password-protected Redis of this module's own, its persistence changed by the tests."""
    server = start_or_skip(lambda: RedisServer(server_dir / "durability-plain", password="s3cret-pw"))
    yield server
    server.stop()


def _configure(server: RedisServer, **settings: str) -> None:
    client = redis.Redis(port=server.port, password=server.password)
    try:
        for name, value in settings.items():
            client.config_set(name, value)
    finally:
        client.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "acknowledged write can be lost" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("settings", "words", "durable"),
    [
        ({"appendonly": "no", "save": ""}, "appendonly is no", False),
        ({"appendonly": "yes", "appendfsync": "everysec"}, "up to a second", False),
        ({"appendonly": "yes", "appendfsync": "always"}, None, True),
    ],
)
async def test_a_server_that_can_lose_acknowledged_writes_is_warned_of_once_per_backend(
    plain_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, str],
    words: str | None,
    durable: bool,
) -> None:
    _configure(plain_redis, **settings)
    with caplog.at_level(logging.DEBUG, logger="recoverable_state"):
        backend = open_backend(plain_redis.url)
        for name in ("a", "b", "c"):
            await backend.open_store(name=name)
        durability = await backend.describe_durability()
        await backend.aclose()
    assert durability.store_kind == "redis"
    assert durability.durable_on_ack is durable
    assert durability.details["appendonly"] == settings["appendonly"]
    found = _warnings(caplog)
    if words is None:
        assert found == []
        return
    (message,) = found
    assert words in message
    assert f"redis://127.0.0.1:{plain_redis.port}/0" in message
    assert "s3cret-pw" not in message
    assert words in durability.summary


async def test_fsync_needs_waitaof_and_says_so_at_open(plain_redis: RedisServer) -> None:
    _configure(plain_redis, appendonly="yes", appendfsync="always")
    client = redis.Redis(port=plain_redis.port, password=plain_redis.password)
    version = str(client.info("server")["redis_version"])
    client.close()
    backend = open_backend(plain_redis.url + "?fsync=true")
    try:
        if tuple(int(p) for p in version.split(".")[:2]) >= (7, 2):
            await backend.open_store(name="fsynced")  # not exercised on this project's Redis 7.0
            assert (await backend.describe_durability()).durable_on_ack is True
            return
        for _ in range(2):  # every call says so, not only the first
            with pytest.raises(StorageError) as caught:
                await backend.open_store(name="fsynced")
            assert f"is version {version}: fsync=true needs WAITAOF, which Redis has since 7.2" in str(
                caught.value
            )
            assert "s3cret-pw" not in str(caught.value)
    finally:
        await backend.aclose()


@pytest.fixture(scope="module")
def acl_server(server_dir: Path) -> Iterator[RedisServer]:
    server = start_or_skip(lambda: RedisServer(server_dir / "durability-acl"))
    admin = redis.Redis(port=server.port)
    admin.acl_setuser(
        "no-dangerous", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@dangerous"]
    )
    admin.acl_setuser(
        "no-connection",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@read", "+@write", "+@scripting", "+hello"],
    )
    admin.close()
    yield server
    server.stop()


async def test_a_user_refused_config_and_info_opens_and_writes(
    acl_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://no-dangerous:pw@127.0.0.1:{acl_server.port}/0"
    with caplog.at_level(logging.DEBUG, logger="recoverable_state"):
        backend = open_backend(url)
        kvs = await KeyValueStore.open(name="acl", storage=backend)
        await kvs.set_value("k", {"a": 1})
        assert await kvs.get_value("k") == {"a": 1}
        durability = await backend.describe_durability()
        await backend.aclose()
    assert durability.durable_on_ack is None
    assert durability.details["refused_by_acl"] == "CONFIG GET, INFO"
    (debug,) = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert "CONFIG GET and INFO refused by the ACL" in debug
    assert _warnings(caplog) == []


async def test_wait_replicas_for_a_user_refused_wait_fails_at_open(acl_server: RedisServer) -> None:
    backend = open_backend(f"redis://no-connection:pw@127.0.0.1:{acl_server.port}/0?wait_replicas=1")
    try:
        with pytest.raises(
            StorageError, match=r"refuses WAIT to this user .*wait_replicas needs the @connection"
        ):
            await backend.open_store(name="acl")
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("wait_replica=1", "query parameter 'wait_replica' that redis:// does not accept (it accepts: "),
        ("wait_replicas=two", "wait_replicas='two' is not a whole number of replicas"),
        ("wait_replicas=-1", "wait_replicas=-1 is not 0 or more"),
        ("wait_timeout=0", "wait_timeout=0.0 is not a number of seconds above 0"),
        ("fsync=maybe", "fsync='maybe' is not true or false"),
    ],
)
def test_bad_durability_options_fail_when_the_url_is_opened(query: str, words: str) -> None:
    with pytest.raises(StorageError) as caught:
        open_backend(f"redis://:sekrit@127.0.0.1:1/0?{query}")
    assert words in str(caught.value)
    assert "sekrit" not in str(caught.value)


def test_the_options_are_accepted_and_listed() -> None:
    with pytest.raises(StorageError) as caught:
        open_backend("redis://127.0.0.1:1/0?nope=1")
    for name in ("wait_replicas", "wait_timeout", "fsync"):
        assert name in str(caught.value)
    backend: Any = open_backend("redis://127.0.0.1:1/0?wait_replicas=2&fsync=yes&wait_timeout=0.5&db=0")
    assert (backend.durability_options.replicas, backend.durability_options.fsync) == (2, True)
    assert backend.durability_options.timeout == 0.5
