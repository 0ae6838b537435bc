"""Servers past one machine, on loopback: a Redis Cluster, a PostgreSQL primary with a
streaming standby, and PgBouncer in front of a PostgreSQL server.

Like the servers in `servers.py`, each lives in its own directory on free ports,
can be killed and started again, and raises ServerUnavailable (with how to
install it) when a binary is missing:

- `RedisClusterServer`: 6 `redis-server` nodes (3 masters, 3 replicas) made into
  one cluster by `redis-cli --cluster create`; `kill_master()` SIGKILLs a master
  and waits until its replica took over, `restart_node()` brings a node back.
- `PostgresPrimaryStandby`: a primary and a hot standby cloned from it by
  `pg_basebackup -R`, streaming synchronously or not (`synchronous_standby_names`);
  `kill_primary()`, `promote()`, `replication()` (the lag), and
  `pause_streaming()` to make an asynchronous standby miss the commits that follow.
- `PgBouncerServer`: Debian's `pgbouncer` with `pool_mode = transaction` in front of a
  `PostgresServer`. PgBouncer refuses to run as root ("PgBouncer should not run
  as root"): as root it runs as the `postgres` user, like PostgreSQL itself.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers import (
    PG_BIN,
    PG_DATABASE,
    PostgresServer,
    ServerUnavailable,
    _stop,
    _wait_for_port,
    free_ports,
    give_to,
    popen_as,
    postgres_user,
)

CLUSTER_SLOTS = 16384


def _until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.02) -> None:
    """Poll `check` until it holds; RuntimeError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


# -- Redis Cluster -----------------------------------------------------------------


class RedisClusterNode:
    """One `redis-server` of a cluster: a client port and a cluster bus port."""

    def __init__(self, cluster: RedisClusterServer, index: int, port: int, bus_port: int) -> None:
        self.cluster = cluster
        self.index = index
        self.port = port
        self.bus_port = bus_port
        self.directory = cluster.directory / f"node-{index}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<node {self.index} 127.0.0.1:{self.port}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start the node (again: its nodes.conf remembers the cluster) and wait until it answers."""
        c = self.cluster
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        with log:
            self.proc = subprocess.Popen(
                [
                    c.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(self.bus_port),
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(c.node_timeout_ms),
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if c.appendonly else "no",
                    "--appendfsync",
                    c.appendfsync,
                    # A master waits 5 s (by default) for more replicas before it sends a full copy.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "no",
                    *(["--requirepass", c.password, "--masterauth", c.password] if c.password else []),
                ],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for_port(self.port, self.proc, f"redis-server (cluster node {self.index})", timeout)
        _until(f"cluster node {self.index} answering PING", lambda: self._answers(), timeout)

    def _answers(self) -> bool:
        try:
            return self.command("PING") in ("PONG", b"PONG", True)
        except Exception:
            return False

    def command(self, *args: Any, timeout: float = 2.0) -> Any:
        """One command on this node alone, its reply as RESP gives it (bulk strings decoded)."""
        import redis

        conn = redis.Connection(
            host="127.0.0.1",
            port=self.port,
            password=self.cluster.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )
        try:
            conn.send_command(*args)
            return conn.read_response()
        finally:
            conn.disconnect()

    def info(self, section: str) -> dict[str, str]:
        """`INFO section` as a dict of strings."""
        text = self.command("INFO", section)
        return dict(
            line.split(":", 1) for line in str(text).splitlines() if ":" in line and not line.startswith("#")
        )

    def cluster_info(self) -> dict[str, str]:
        """`CLUSTER INFO` as a dict (`cluster_state`, `cluster_slots_ok`, ...)."""
        text = str(self.command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def kill(self) -> None:
        """SIGKILL the node, as a crash would."""
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        """Shut the node down."""
        _stop(self.proc, signal.SIGTERM)


@dataclass(frozen=True)
class ClusterMember:
    """One line of `CLUSTER NODES`, as a live node sees the cluster."""

    node_id: str
    port: int
    master: bool
    failed: bool
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def slot_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.slots)


@dataclass(frozen=True)
class Failover:
    """What `kill_master` saw: the master killed, the replica promoted, how long it took."""

    killed: RedisClusterNode
    promoted: RedisClusterNode
    seconds: float
    """From the SIGKILL until every live node said `cluster_state:ok` with the replica owning the slots."""


class RedisClusterServer:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, on loopback.

    `appendonly`/`appendfsync` are every node's persistence settings (by default an
    acknowledged write is in the AOF on disk). `node_timeout_ms` is
    `cluster-node-timeout`: how long a master may be silent before its replica
    takes over (Redis' default is 15 s; 1 s here so that failovers are quick).
    With `password`, every node requires it (`requirepass`, and `masterauth` so
    that replicas can sync).
    """

    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        appendonly: bool = True,
        appendfsync: str = "always",
        node_timeout_ms: int = 1000,
        password: str | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or cli is None:
            raise ServerUnavailable(
                "redis-server or redis-cli is not on PATH; "
                "install them with `apt-get install -y redis-server`"
            )
        self.binary = binary
        self.cli = cli
        self.directory = directory
        self.masters = masters
        self.replicas = replicas
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        directory.mkdir(parents=True, exist_ok=True)
        count = masters * (1 + replicas)
        ports = free_ports(2 * count)
        self.nodes = [RedisClusterNode(self, i, ports[2 * i], ports[2 * i + 1]) for i in range(count)]
        self.port = self.nodes[0].port
        self.started_in: float | None = None
        """Seconds the first `start()` took, from starting the nodes to a healthy cluster."""

    @property
    def ports(self) -> list[int]:
        """Every port the cluster listens on (clients' and the cluster bus')."""
        return [p for node in self.nodes for p in (node.port, node.bus_port)]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, for redis-py's `RedisCluster(startup_nodes=...)`."""
        return [("127.0.0.1", node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`: every node a seed (for the backend to take)."""
        auth = f":{self.password}@" if self.password else ""
        return "redis+cluster://" + auth + ",".join(node.address for node in self.nodes)

    @property
    def seed_url(self) -> str:
        """`redis://127.0.0.1:p1/0` of the first node, for `redis.RedisCluster.from_url`."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.nodes[0].address}/0"

    def client(self, **options: Any) -> Any:
        """A redis-py `RedisCluster` on this cluster (close it after use)."""
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self.startup_nodes],
            password=self.password,
            **options,
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start every node; create the cluster the first time; wait until it is healthy."""
        began = time.monotonic()
        for node in self.nodes:
            if not node.running:
                node.start()
        if not self._formed():
            self._create(timeout)
        self.wait_healthy(timeout)
        if self.started_in is None:
            self.started_in = time.monotonic() - began

    def _formed(self) -> bool:
        return int(self.nodes[0].cluster_info().get("cluster_known_nodes", "1")) == len(self.nodes)

    def _create(self, timeout: float) -> None:
        args = [
            self.cli,
            *(["-a", self.password, "--no-auth-warning"] if self.password else []),
            "--cluster",
            "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        (self.directory / "create.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or "All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")

    def members(self, via: RedisClusterNode | None = None) -> list[ClusterMember]:
        """The cluster as `via` (default: the first live node) sees it, from `CLUSTER NODES`."""
        node = via or self.live_nodes()[0]
        found = []
        for line in str(node.command("CLUSTER", "NODES")).splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            flags = fields[2].split(",")
            slots = []
            for part in fields[8:]:
                if part.startswith("["):  # a slot being migrated
                    continue
                lo, _, hi = part.partition("-")
                slots.append((int(lo), int(hi or lo)))
            found.append(
                ClusterMember(
                    node_id=fields[0],
                    port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                    master="master" in flags,
                    failed="fail" in flags or "fail?" in flags,
                    master_id=None if fields[3] == "-" else fields[3],
                    slots=tuple(slots),
                )
            )
        return found

    def live_nodes(self) -> list[RedisClusterNode]:
        return [node for node in self.nodes if node.running]

    def node_at(self, port: int) -> RedisClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def master_nodes(self) -> list[RedisClusterNode]:
        """The nodes that are masters owning slots now (as the first live node sees it)."""
        return [self.node_at(m.port) for m in self.members() if m.master and not m.failed and m.slots]

    def master_of_slot(self, slot: int) -> RedisClusterNode:
        for m in self.members():
            if m.master and not m.failed and any(lo <= slot <= hi for lo, hi in m.slots):
                return self.node_at(m.port)
        raise LookupError(f"no live master owns slot {slot}")

    def replica_of(self, master: RedisClusterNode) -> RedisClusterNode:
        members = self.members()
        master_id = next(m.node_id for m in members if m.port == master.port)
        return next(self.node_at(m.port) for m in members if m.master_id == master_id and not m.failed)

    def healthy(self) -> bool:
        """Every node runs, says `cluster_state:ok`, and sees the same masters owning all slots.

        Every replica must be in sync too (`master_link_status:up`), so that `WAIT 1`
        right after may be answered. A node just restarted believes its old role
        for a moment, so each node's own view is compared, not one node's.
        """
        try:
            if len(self.live_nodes()) != len(self.nodes):
                return False
            views = []
            for node in self.nodes:
                info = node.cluster_info()
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                    return False
                if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                    return False
                replication = node.info("replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
                members = self.members(node)
                if any(m.failed for m in members):
                    return False
                masters = {m.port: m.slots for m in members if m.master and m.slots}
                replicas = {m.port: m.master_id for m in members if not m.master}
                if len(masters) != self.masters or len(replicas) != len(self.nodes) - self.masters:
                    return False
                views.append((masters, replicas))
            return all(view == views[0] for view in views)
        except Exception:  # a node still loading, a connection refused
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        _until("the Redis Cluster becoming healthy", self.healthy, timeout, interval=0.05)

    def kill_master(self, node: RedisClusterNode | None = None, timeout: float = 30.0) -> Failover:
        """SIGKILL a master (default: the one owning slot 0) and wait until its replica replaced it.

        Done when every live node says `cluster_state:ok` and sees the replica as the
        master owning the killed master's slots. The killed node stays down
        (`restart_node` brings it back, as a replica).
        """
        master = node or self.master_of_slot(0)
        members = self.members()
        mine = next(m for m in members if m.port == master.port)
        if not mine.master:
            raise ValueError(f"{master} is not a master")
        replica = self.replica_of(master)
        began = time.monotonic()
        master.kill()

        def promoted() -> bool:
            try:
                for live in self.live_nodes():
                    if live.cluster_info().get("cluster_state") != "ok":
                        return False
                    seen = next(m for m in self.members(live) if m.port == replica.port)
                    if not (seen.master and set(seen.slots) >= set(mine.slots)):
                        return False
                return True
            except Exception:
                return False

        _until(f"the replica {replica} taking over from {master}", promoted, timeout)
        return Failover(master, replica, time.monotonic() - began)

    def restart_node(self, node: RedisClusterNode, timeout: float = 60.0) -> None:
        """Start a killed or stopped node again and wait until the cluster is healthy (it rejoins)."""
        node.start()
        self.wait_healthy(timeout)

    def restore(self, timeout: float = 60.0) -> None:
        """Bring back every node that is down and empty every master: a fresh cluster for the next test."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_healthy(timeout)
        for master in self.master_nodes():
            master.command("FLUSHALL", "SYNC")

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# -- PostgreSQL primary and standby -----------------------------------------------------


class PostgresStandbyServer(PostgresServer):
    """A hot standby streaming from `primary`, its data cloned by `pg_basebackup -R`.

    `name` is its `cluster_name`, which the walreceiver gives the primary as its
    `application_name`: what `synchronous_standby_names` on the primary names.
    """

    def __init__(
        self, directory: Path, primary: PostgresServer, port: int | None = None, *, name: str = "standby"
    ) -> None:
        if not (PG_BIN / "pg_basebackup").exists() or not (PG_BIN / "pg_ctl").exists():
            raise ServerUnavailable(
                f"{PG_BIN / 'pg_basebackup'} or pg_ctl is missing; install PostgreSQL 15 with "
                "`apt-get install -y postgresql-15` (or set RECOVERABLE_STATE_PG_BIN)"
            )
        # Feedback to the primary once a second (not every 10 s): pg_stat_replication's
        # flush and replay positions stay fresh, and waiting for a caught-up standby is quick.
        settings = {"cluster_name": name, "wal_receiver_status_interval": "1"}
        super().__init__(directory, port, settings=settings)
        self.primary = primary
        self.name = name

    def init(self) -> None:
        """Clone the primary (unless done before): a base backup that starts as a standby."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._give_to_user(self.directory)
        self.sockets.mkdir(exist_ok=True)
        self._give_to_user(self.sockets)
        if (self.data / "PG_VERSION").exists():
            return
        proc = self._popen(
            [
                str(PG_BIN / "pg_basebackup"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary.port),
                "-U",
                "postgres",
                "-R",  # standby.signal and primary_conninfo in postgresql.auto.conf
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed:\n{out.decode(errors='replace')}")
        # The clone copies the primary's `synchronous_standby_names` (ALTER SYSTEM, set once the
        # first standby streamed): once promoted, with no standby of its own, every COMMIT would
        # wait for ever. A failover manager resets it on promotion; the clone goes without it.
        auto = self.data / "postgresql.auto.conf"
        kept = [ln for ln in auto.read_text().splitlines() if not ln.startswith("synchronous_standby_names")]
        auto.write_text("\n".join(kept) + "\n")  # in place: its owner stays

    def _create_database(self) -> None:
        """Nothing to do: the database came with the base backup (and a standby is read-only)."""

    def promote(self, timeout: float = 30.0) -> None:
        """`pg_ctl promote -w`: end recovery, and wait until the server takes writes."""
        proc = self._popen(
            [str(PG_BIN / "pg_ctl"), "promote", "-D", str(self.data), "-w", "-t", str(int(timeout))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=timeout + 5)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed:\n{out.decode(errors='replace')}")

    def wipe(self) -> None:
        """Stop the server and delete its data (the next `start()` clones the primary again)."""
        self.kill()
        shutil.rmtree(self.data, ignore_errors=True)


@dataclass(frozen=True)
class Replication:
    """The primary's `pg_stat_replication` row for the standby."""

    state: str
    """`streaming` once caught up with the primary's WAL."""
    sync_state: str
    """`sync` for a synchronous standby, `async` otherwise."""
    sent_lsn: str
    flush_lsn: str | None
    replay_lsn: str | None
    """None until the standby's first feedback message."""
    replay_lag_bytes: int | None
    """WAL bytes written on the primary and not yet replayed on the standby (None: not known yet)."""


class PostgresPrimaryStandby:
    """A PostgreSQL primary and one hot standby streaming from it, on loopback.

    `synchronous=True` sets the primary's `synchronous_standby_names` to the
    standby's name: a COMMIT returns once the standby has flushed its WAL
    (`synchronous_commit=on`). Otherwise the standby may lag behind.
    `url` is the multi-host URL a client uses to follow a failover.
    """

    def __init__(self, directory: Path, *, synchronous: bool, standby_name: str = "standby") -> None:
        self.directory = directory
        self.synchronous = synchronous
        primary_port, standby_port = free_ports(2)
        self.primary = PostgresServer(directory / "primary", primary_port)
        self.standby = PostgresStandbyServer(
            directory / "standby", self.primary, standby_port, name=standby_name
        )
        self.port = primary_port
        self.ports = [primary_port, standby_port]
        self.started_in: float | None = None
        self._paused_conninfo: str | None = None

    @property
    def url(self) -> str:
        """`postgresql://postgres@127.0.0.1:p1,127.0.0.1:p2/rs_test?target_session_attrs=read-write`."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{PG_DATABASE}?target_session_attrs=read-write"
        )

    @property
    def primary_url(self) -> str:
        return self.primary.url

    @property
    def standby_url(self) -> str:
        return self.standby.url

    def start(self, timeout: float = 60.0) -> None:
        """Start the primary and the standby (cloning it the first time); wait until it streams."""
        began = time.monotonic()
        self.primary.start()
        self.standby.start()
        if self.synchronous:
            # Only now: until a standby streams, every commit on the primary would wait
            # (CREATE DATABASE too). ALTER SYSTEM keeps it across restarts of the primary.
            self._primary_query(f"ALTER SYSTEM SET synchronous_standby_names = '{self.standby.name}'")
            self._primary_query("SELECT pg_reload_conf()")
        self.wait_streaming(timeout)
        if self.started_in is None:
            self.started_in = time.monotonic() - began

    def _primary_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.primary.url, autocommit=True, connect_timeout=2) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def _standby_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.standby.url, autocommit=True, connect_timeout=2) as conn:
            return conn.execute(sql, params).fetchall()

    def replication(self) -> Replication | None:
        """The primary's view of the standby (None: not connected)."""
        rows = self._primary_query(
            "SELECT state, sync_state, sent_lsn::text, flush_lsn::text, replay_lsn::text, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
            "FROM pg_stat_replication WHERE application_name = %s",
            (self.standby.name,),
        )
        if not rows:
            return None
        state, sync_state, sent, flush, replay, lag = rows[0]
        return Replication(state, sync_state, sent, flush, replay, None if lag is None else int(lag))

    def replay_lag_bytes(self) -> int | None:
        """WAL bytes the standby has not replayed yet, as the primary sees it (None: not known yet)."""
        found = self.replication()
        if found is None:
            raise RuntimeError("the standby is not connected to the primary")
        return found.replay_lag_bytes

    def standby_lag(self) -> dict[str, Any]:
        """The standby's own view: received and replayed LSNs, paused, seconds behind."""
        ((received, replayed, paused, behind),) = self._standby_query(
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, "
            "pg_is_wal_replay_paused(), "
            "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
        )
        return {
            "received_lsn": received,
            "replayed_lsn": replayed,
            "replay_paused": paused,
            "seconds": behind,
        }

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until the standby streams (`sync` when synchronous) and has replayed all WAL."""
        wanted = "sync" if self.synchronous else "async"

        def streaming() -> bool:
            try:
                found = self.replication()
            except Exception:
                return False
            return (
                found is not None
                and found.state == "streaming"
                and found.sync_state == wanted
                and found.replay_lag_bytes == 0
            )

        _until("the standby streaming from the primary", streaming, timeout, interval=0.05)

    def healthy(self) -> bool:
        """Both servers run, the standby is still a standby, and it streams as configured."""
        for server in (self.primary, self.standby):
            if server.proc is None or server.proc.poll() is not None:
                return False
        if self._paused_conninfo is not None:
            return False
        try:
            ((recovering,),) = self._standby_query("SELECT pg_is_in_recovery()")
            found = self.replication()
        except Exception:
            return False
        wanted = "sync" if self.synchronous else "async"
        return (
            bool(recovering)
            and found is not None
            and found.state == "streaming"
            and found.sync_state == wanted
        )

    def wait_replayed(self, timeout: float = 30.0) -> None:
        """Wait until the standby has replayed everything the primary wrote."""
        _until("the standby catching up", lambda: self.replay_lag_bytes() == 0, timeout)

    def pause_streaming(self, timeout: float = 30.0) -> None:
        """Stop the standby's walreceiver: from now on it gets no WAL (set `primary_conninfo` to '').

        On an asynchronous pair the primary's commits go on and the standby misses
        them; on a synchronous one every COMMIT waits (for ever) until `resume_streaming`.
        """
        import psycopg

        with psycopg.connect(self.standby.url, autocommit=True, connect_timeout=2) as conn:
            row = conn.execute("SHOW primary_conninfo").fetchone()
            assert row is not None
            self._paused_conninfo = str(row[0])
            conn.execute("ALTER SYSTEM SET primary_conninfo = ''")
            conn.execute("SELECT pg_reload_conf()")
        _until(
            "the standby's walreceiver stopping",
            lambda: (
                not self._standby_query("SELECT 1 FROM pg_stat_wal_receiver") and self.replication() is None
            ),
            timeout,
        )

    def resume_streaming(self, timeout: float = 30.0) -> None:
        """Undo `pause_streaming` and wait until the standby streams again."""
        import psycopg
        from psycopg import sql

        if self._paused_conninfo is None:
            return
        with psycopg.connect(self.standby.url, autocommit=True, connect_timeout=2) as conn:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(self._paused_conninfo))
            )
            conn.execute("SELECT pg_reload_conf()")
        self._paused_conninfo = None
        self.wait_streaming(timeout)

    def kill_primary(self) -> None:
        """SIGKILL the primary and all its processes, as a crash of its host would."""
        self.primary.kill()

    def promote(self, timeout: float = 30.0) -> float:
        """Promote the standby (`pg_ctl promote -w`); the seconds until it takes writes."""
        import psycopg

        began = time.monotonic()
        self.standby.promote(timeout)

        def writable() -> bool:
            with psycopg.connect(self.standby.url, autocommit=True, connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                return row is not None and row[0] is False

        _until("the promoted standby taking writes", writable, timeout)
        return time.monotonic() - began

    def restore(self, timeout: float = 60.0) -> None:
        """A fresh pair for the next test: the old primary back, the standby cloned from it anew.

        Whatever the promoted standby took since is thrown away; the primary comes back
        on its own port (after crash recovery when it was killed).
        """
        self.standby.wipe()
        self._paused_conninfo = None
        if self.primary.proc is None or self.primary.proc.poll() is not None:
            self.primary.start()
        self.standby.start()
        self.wait_streaming(timeout)

    def kill(self) -> None:
        self.standby.kill()
        self.primary.kill()

    def stop(self) -> None:
        # The standby first: a primary waiting for a synchronous standby would wait on.
        self.standby.stop()
        self.primary.stop()


# -- PgBouncer --------------------------------------------------------------------------


def pgbouncer_binary() -> str:
    """Where Debian's `pgbouncer` is (it installs to /usr/sbin, off a non-root PATH)."""
    found = shutil.which("pgbouncer") or next(
        (str(p) for p in (Path("/usr/sbin/pgbouncer"), Path("/usr/bin/pgbouncer")) if p.exists()), None
    )
    if found is None:
        raise ServerUnavailable("pgbouncer is missing; install it with `apt-get install -y pgbouncer`")
    return found


class PgBouncerServer:
    """PgBouncer in front of `upstream` (a PostgresServer trusting loopback), on a free port.

    `pool_mode = transaction` by default: a server connection serves a client for
    one transaction only, as in most fleets. Clients log in without a password
    (`auth_type = trust`; the user must be listed in the auth file: `postgres`).
    At most `pool_size` server connections per database and user; `settings` are
    more lines of its `[pgbouncer]` section (`{"query_wait_timeout": "2"}`). Its config,
    auth file and log live in `directory`. The admin console is the database
    `pgbouncer` (`admin_url`: `SHOW POOLS`, `SHOW SERVERS`, ...).
    """

    def __init__(
        self,
        directory: Path,
        upstream: PostgresServer,
        port: int | None = None,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 4,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.binary = pgbouncer_binary()
        self.settings = dict(settings or {})
        self.directory = directory
        self.upstream = upstream
        self.port = port or free_ports(1)[0]
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = postgres_user()
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        """`postgresql://postgres@127.0.0.1:<port>/rs_test`, through PgBouncer."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{PG_DATABASE}"

    @property
    def admin_url(self) -> str:
        """The admin console (simple query protocol only: use a `psycopg.ClientCursor`)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer"

    def _write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        give_to(self._user, self.directory)
        users = self.directory / "userlist.txt"
        users.write_text('"postgres" ""\n')
        config = self.directory / "pgbouncer.ini"
        config.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host=127.0.0.1 port={self.upstream.port}",
                    "",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {users}",
                    "admin_users = postgres",
                    f"pool_mode = {self.pool_mode}",
                    f"default_pool_size = {self.pool_size}",
                    "max_client_conn = 500",
                    f"logfile = {self.directory / 'pgbouncer.log'}",
                    *(f"{name} = {value}" for name, value in self.settings.items()),
                    "",
                ]
            )
        )
        for path in (users, config):
            give_to(self._user, path)
        return config

    def start(self, timeout: float = 15.0) -> None:
        """Start PgBouncer (again, on the same port) and wait until a query passes through it."""
        import psycopg

        began = time.monotonic()
        config = self._write_config()
        self.proc = popen_as(
            self._user,
            [self.binary, str(config)],
            self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it logs to its logfile
            start_new_session=True,
        )
        try:
            _wait_for_port(self.port, self.proc, "pgbouncer", timeout)
        except RuntimeError as exc:
            log = self.directory / "pgbouncer.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{exc}\n{tail}") from None

        def passes() -> bool:
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                return False

        _until("a query passing through pgbouncer", passes, timeout)
        if self.started_in is None:
            self.started_in = time.monotonic() - began

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        """Shut PgBouncer down at once (SIGTERM; SIGINT would wait for its clients)."""
        _stop(self.proc, signal.SIGTERM)
