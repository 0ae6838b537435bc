"""What the Redis durability options (`wait_replicas=N`, `fsync`, the warning at open) will
read from the server: WAIT's reply, WAITAOF's absence on 7.0, the persistence settings,
and the ACL rules that refuse those commands to a restricted user."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions

from fleet_servers import RedisClusterServer
from servers import RedisServer, start_or_skip


def _version(client: redis.Redis) -> tuple[int, ...]:
    return tuple(int(part) for part in str(client.info("server")["redis_version"]).split("."))


def test_wait_counts_the_replicas_that_acknowledged(cluster: RedisClusterServer) -> None:
    master = cluster.master_of_slot(0)
    client = redis.Redis(port=master.port)
    try:
        key = next(k for k in (f"w{i}" for i in range(1000)) if client.cluster("KEYSLOT", k) <= 5460)
        client.set(key, "1")
        assert client.wait(1, 1000) == 1
        client.set(key, "2")
        began = time.monotonic()
        assert client.wait(2, 200) == 1  # one replica only: WAIT gives up after its timeout
        assert time.monotonic() - began >= 0.19
    finally:
        client.close()


def test_wait_on_a_server_without_replicas_answers_zero_after_its_timeout(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.set("rs:fleet:wait", "1")
        began = time.monotonic()
        assert client.wait(1, 100) == 0  # not an error: the backend must turn 0 < N into one
        assert time.monotonic() - began >= 0.09
        assert client.wait(0, 0) == 0
    finally:
        client.delete("rs:fleet:wait")
        client.close()


def test_waitaof_is_an_unknown_command_before_redis_7_2(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        if _version(client) >= (7, 2):
            assert client.execute_command("WAITAOF", 1, 0, 100) == [1, 0]
            return
        with pytest.raises(redis.exceptions.ResponseError) as caught:
            client.execute_command("WAITAOF", 1, 0, 100)
        assert str(caught.value).startswith("unknown command 'WAITAOF', with args beginning with:")
    finally:
        client.close()


def test_the_persistence_settings_are_readable(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        persistence = client.info("persistence")
        assert persistence["aof_enabled"] == 1
        assert persistence["aof_last_write_status"] == "ok"
        assert client.info("replication")["role"] == "master"
    finally:
        client.close()


@pytest.mark.slow
def test_a_cluster_without_aof_says_so_on_every_node(tmp_path: Path) -> None:
    cluster = start_or_skip(
        lambda: RedisClusterServer(
            tmp_path / "no-aof", masters=3, replicas=0, appendonly=False, appendfsync="everysec"
        )
    )
    try:
        for node in cluster.nodes:
            assert node.command("CONFIG", "GET", "append*") == {
                "appendonly": "no",
                "appendfsync": "everysec",
                "appendfilename": "appendonly.aof",
                "appenddirname": "appendonlydir",
            }
            assert node.info("persistence")["aof_enabled"] == "0"
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def acl_redis(server_dir: Path) -> Iterator[RedisServer]:
    """A Redis server of this module's own, with users of a few ACL rules an operator might give."""
    server = start_or_skip(lambda: RedisServer(server_dir / "acl-redis"))
    admin = redis.Redis(port=server.port)
    rules = {
        "no-dangerous": ["+@all", "-@dangerous"],
        "no-admin": ["+@all", "-@admin"],
        "read-write-scripting": ["+@read", "+@write", "+@scripting"],
        "read-write-scripting-connection": ["+@read", "+@write", "+@scripting", "+@connection"],
    }
    for user, rule in rules.items():
        admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=rule)
    admin.close()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("user", "refused"),
    [
        ("no-dangerous", {"config|get", "info"}),
        ("no-admin", {"config|get"}),
        ("read-write-scripting", {"config|get", "info", "wait", "cluster|slots"}),
        ("read-write-scripting-connection", {"config|get", "info", "cluster|slots"}),
    ],
)
def test_acl_rules_that_refuse_the_durability_checks(
    acl_redis: RedisServer, user: str, refused: set[str]
) -> None:
    client = redis.Redis(port=acl_redis.port, username=user, password="pw")
    calls = {
        "config|get": lambda: client.config_get("appendonly"),
        "info": lambda: client.info("persistence"),
        "wait": lambda: client.wait(0, 0),
        "cluster|slots": lambda: client.execute_command("CLUSTER", "SLOTS"),
    }
    answers: dict[str, str] = {}
    try:
        for name, call in calls.items():
            try:
                call()
                answers[name] = "allowed"
            except redis.exceptions.NoPermissionError as exc:
                answers[name] = str(exc)
            except redis.exceptions.ResponseError as exc:  # allowed, but no cluster here
                answers[name] = "allowed" if "cluster support disabled" in str(exc) else str(exc)
    finally:
        client.close()
    assert answers == {
        name: f"this user has no permissions to run the '{name}' command" if name in refused else "allowed"
        for name in calls
    }
