"""One batch on a Redis Cluster against the same batch on one Redis server, through the backend.

    python benchmarks/redis_cluster.py                    # 2,000 records of 600 bytes, 20 rounds
    python benchmarks/redis_cluster.py --records 10000 --rounds 10

Starts, on loopback, a 6-node Redis Cluster (3 masters, 3 replicas) and one
Redis server, both with `appendfsync always` (tests/fleet_servers.py,
tests/servers.py). Each store runs in a fresh process of its own, which opens
the backend, makes one store and times, per round: `write_batch` of every
record (each a new version), `read_batch` of every record with a claim, and
`list_records` of the first 1,000. The table shows p50 and p99 in ms and the
ratio of the cluster's p50 to the single server's. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEPS = ("write_batch", "read_batch (claim)", "list_records (1,000)")


def child(url: str, records: int, rounds: int) -> dict[str, list[float]]:
    """The timings of one store (run in its own process)."""
    import anyio

    from recoverable_state.storage import RecordRead, RecordWrite, open_backend

    async def run() -> dict[str, list[float]]:
        timings: dict[str, list[float]] = {step: [] for step in STEPS}
        async with open_backend(url) as backend:
            store = await backend.open_store(name="bench")
            keys = [f"state-{i:06d}" for i in range(records)]
            value = b"x" * 600
            for _ in range(rounds + 1):  # the first round warms up (scripts loaded, connections made)
                began = time.perf_counter()
                await backend.write_batch([RecordWrite(store.id, k, value, "application/json") for k in keys])
                wrote = time.perf_counter()
                await backend.read_batch([RecordRead(store.id, k, claim=True) for k in keys])
                read = time.perf_counter()
                await backend.list_records(store.id, limit=1000)
                listed = time.perf_counter()
                for step, seconds in zip(STEPS, (wrote - began, read - wrote, listed - read), strict=True):
                    timings[step].append(seconds * 1000)
        return {step: times[1:] for step, times in timings.items()}

    return anyio.run(run)


def _p(times: Sequence[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.records, args.rounds)))
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from fleet_servers import RedisClusterServer
    from servers import RedisServer

    results: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rs-cluster-bench-")))
        cluster = RedisClusterServer(directory / "cluster")
        cluster.start()
        stack.callback(cluster.stop)
        single = RedisServer(directory / "redis")
        single.start()
        stack.callback(single.stop)
        for name, url in (("Redis Cluster, 3 masters", cluster.url), ("one Redis", single.url)):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    url,
                    "--records",
                    str(args.records),
                    "--rounds",
                    str(args.rounds),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[name] = json.loads(done.stdout)
    print(
        f"{args.records:,} records of 600 bytes, {args.rounds} rounds, {os.cpu_count()} CPUs, p50 / p99 in ms"
    )
    print()
    names = list(results)
    print(f"{'step':24}" + "".join(f"{n:>28}" for n in names) + f"{'cluster / one':>16}")
    for step in STEPS:
        cells = [f"{_p(results[n][step], 0.5):10.1f} / {_p(results[n][step], 0.99):8.1f}" for n in names]
        ratio = statistics.median(results[names[0]][step]) / statistics.median(results[names[1]][step])
        print(f"{step:24}" + "".join(f"{c:>28}" for c in cells) + f"{ratio:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
