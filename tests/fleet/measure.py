"""Figures for docs/dev/fleet-findings.md, measured on the fleet test servers (raw clients).

    .venv/bin/python tests/fleet/measure.py            # about a minute
    .venv/bin/python tests/fleet/measure.py --rounds 3 # failovers and promotions per kind

Prints how long each server takes to start, Redis Cluster failover times, the
latency of a write with and without `WAIT 1`, of a PostgreSQL commit with a
synchronous standby, direct and `synchronous_commit=local`, promotion times, and
round trips and connects through PgBouncer against direct. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/

import psycopg
import redis

from fleet_servers import PgBouncerServer, PostgresPrimaryStandby, RedisClusterServer
from servers import PostgresServer


def timed(call: Callable[[], object], count: int) -> list[float]:
    """Seconds each of `count` calls took."""
    found = []
    for _ in range(count):
        began = time.perf_counter()
        call()
        found.append(time.perf_counter() - began)
    return sorted(found)


def line(what: str, seconds: list[float]) -> None:
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    print(f"  {what:<52} p50 {statistics.median(seconds) * 1e3:8.3f} ms   p99 {p99 * 1e3:8.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="failovers and promotions each (default 3)")
    parser.add_argument("--count", type=int, default=2000, help="calls per latency figure (default 2000)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rs-fleet-measure-")))
        base.chmod(0o755)
        print("start (from nothing to serving)")
        began = time.monotonic()
        postgres = PostgresServer(base / "postgres")
        stack.callback(postgres.stop)
        postgres.start()
        print(f"  {'PostgreSQL (initdb + start), for comparison':<52} {time.monotonic() - began:6.2f} s")
        cluster = RedisClusterServer(base / "cluster")
        stack.callback(cluster.stop)
        cluster.start()
        print(f"  {'Redis Cluster, 6 nodes (create + healthy)':<52} {cluster.started_in:6.2f} s")
        pairs = {}
        for sync in (True, False):
            pair = PostgresPrimaryStandby(base / f"pair-{sync}", synchronous=sync)
            stack.callback(pair.stop)
            pair.start()
            pairs[sync] = pair
            kind = "synchronous" if sync else "asynchronous"
            print(f"  {'PostgreSQL primary + ' + kind + ' standby':<52} {pair.started_in:6.2f} s")
        bouncer = PgBouncerServer(base / "pgbouncer", postgres)
        stack.callback(bouncer.stop)
        bouncer.start()
        print(f"  {'PgBouncer (in front of a running PostgreSQL)':<52} {bouncer.started_in:6.2f} s")

        print(f"\nRedis Cluster: a write to the master of slot 0 ({args.count} calls each)")
        master = cluster.master_of_slot(0)
        client = redis.Redis(port=master.port)
        key = next(k for k in (f"m{i}" for i in range(1000)) if client.cluster("KEYSLOT", k) <= 5460)
        line("SET", timed(lambda: client.set(key, "x" * 600), args.count))
        line(
            "SET + WAIT 1 1000 (one replica acknowledged)",
            timed(lambda: (client.set(key, "x" * 600), client.wait(1, 1000)), args.count),
        )
        client.close()
        print(f"\nRedis Cluster failover (SIGKILL a master, node timeout {cluster.node_timeout_ms} ms)")
        for _ in range(args.rounds):
            failover = cluster.kill_master()
            restart = time.monotonic()
            cluster.restart_node(failover.killed)
            print(
                f"  replica promoted, cluster ok on every node after {failover.seconds:5.2f} s; "
                f"old master back as a replica in {time.monotonic() - restart:4.2f} s"
            )

        print(f"\nPostgreSQL: one-row INSERT, autocommit ({args.count // 4} commits each)")
        for sync, pair in pairs.items():
            with psycopg.connect(pair.primary_url, autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS measure (v text)")
                pair.wait_replayed()
                label = "synchronous standby" if sync else "asynchronous standby"
                line(
                    f"COMMIT, {label}",
                    timed(
                        lambda conn=conn: conn.execute("INSERT INTO measure VALUES ('x')"), args.count // 4
                    ),
                )
                if sync:
                    conn.execute("SET synchronous_commit = local")
                    line(
                        "COMMIT, synchronous standby, synchronous_commit=local",
                        timed(
                            lambda conn=conn: conn.execute("INSERT INTO measure VALUES ('x')"),
                            args.count // 4,
                        ),
                    )

        print("\nPostgreSQL promotion (SIGKILL the primary, `pg_ctl promote -w`, until it takes writes)")
        for sync, pair in pairs.items():
            for _ in range(args.rounds):
                pair.kill_primary()
                seconds = pair.promote()
                began = time.monotonic()
                with psycopg.connect(pair.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                found = time.monotonic() - began
                print(
                    f"  {'synchronous' if sync else 'asynchronous'} pair: promoted in {seconds:5.2f} s; "
                    f"multi-host URL connects in {found * 1e3:5.1f} ms"
                )
                pair.restore()

        print(f"\nPgBouncer (transaction pooling) against direct ({args.count} calls each)")
        for label, url in (("direct", postgres.url), ("through PgBouncer", bouncer.url)):
            with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
                line(f"SELECT 1, {label}", timed(lambda conn=conn: conn.execute("SELECT 1"), args.count))
            with psycopg.connect(url, prepare_threshold=None) as conn:

                def transaction(conn: psycopg.Connection = conn) -> None:
                    with conn.pipeline():
                        conn.execute("SELECT set_config('statement_timeout', '10000', true)")
                        conn.execute("SELECT txid_current()")
                    conn.commit()

                line(
                    f"pipelined set_config + txid_current + COMMIT, {label}",
                    timed(transaction, args.count // 2),
                )
            line(
                f"connect + close, {label}",
                timed(lambda url=url: psycopg.connect(url, autocommit=True).close(), args.count // 10),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
