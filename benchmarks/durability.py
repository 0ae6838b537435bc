"""What the durability options cost: one persist of N changed states, per option.

    python benchmarks/durability.py                      # 2,000 states, 30 rounds
    python benchmarks/durability.py --states 200 --rounds 100

Starts a throwaway Redis primary with one replica (`REPLICAOF`) and a PostgreSQL
server on loopback (tests/servers.py), then, per URL variant, persists `--states`
states (each changed before every round) with one `RecoverableState.persist_many`
call, `--rounds` times, and prints p50 and p99 of the persist's wall time. The
variants: Redis plain, `wait_replicas=1`; PostgreSQL with the server's
`synchronous_commit` (on), `local` and `off`. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


async def _measure(url: str, states: int, rounds: int) -> list[float]:
    from pydantic import BaseModel

    from recoverable_state import RecoverableState, open_backend, service_locator

    class Counter(BaseModel):
        n: int = 0
        note: str = "x" * 500

    service_locator.reset()
    backend = open_backend(url)
    service_locator.set_storage(backend)
    made = [
        RecoverableState(
            default_state=Counter(), persist_state_key=f"s{i}", persistence_enabled="explicit_only"
        )
        for i in range(states)
    ]
    await RecoverableState.initialize_many(made)
    took = []
    for _ in range(rounds):
        for state in made:
            state.current_value.n += 1
        began = time.perf_counter()
        await RecoverableState.persist_many(made)
        took.append(time.perf_counter() - began)
    for state in made:
        await state.teardown()
    await backend.aclose()
    service_locator.reset()
    return took


def main() -> int:
    import anyio
    import redis

    from servers import PostgresServer, RedisServer, flush_postgres, flush_redis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="rs-durability-"))
    top.chmod(0o755)
    primary, replica = RedisServer(top / "primary"), RedisServer(top / "replica")
    postgres = PostgresServer(top / "postgres")
    for server in (primary, replica, postgres):
        server.start()
    try:
        client = redis.Redis(port=replica.port)
        client.replicaof("127.0.0.1", primary.port)
        while client.info("replication").get("master_link_status") != "up":
            time.sleep(0.05)
        client.close()
        variants = [
            ("redis", primary.url),
            ("redis wait_replicas=1", primary.url + "?wait_replicas=1&wait_timeout=5"),
            ("postgresql (on)", postgres.url),
            ("postgresql synchronous_commit=local", postgres.url + "?synchronous_commit=local"),
            ("postgresql synchronous_commit=off", postgres.url + "?synchronous_commit=off"),
        ]
        print(f"{args.states} states a persist, {args.rounds} rounds")
        print(f"{'variant':40} {'p50 ms':>8} {'p99 ms':>8}")
        for name, url in variants:
            flush_redis(primary.url) if url.startswith("redis") else flush_postgres(postgres.url)
            took = sorted(anyio.run(_measure, url, args.states, args.rounds))
            p99 = took[min(len(took) - 1, round(0.99 * (len(took) - 1)))]
            print(f"{name:40} {statistics.median(took) * 1000:8.1f} {p99 * 1000:8.1f}")
    finally:
        for server in (replica, primary, postgres):
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
