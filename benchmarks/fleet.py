"""Fleet benchmark: K worker processes persisting against one PostgreSQL and one Redis.

    python benchmarks/fleet.py                          # K = 1, 4, 16; 60 s each; both servers
    python benchmarks/fleet.py --ks 1,4 --seconds 10    # shorter, for a small machine
    python benchmarks/fleet.py --stores redis --redis-url redis://127.0.0.1:6379/0

Each worker is its own process with `--states` states (2,000 by default). Every
second it changes every state in place (a counter and a short list) and then
persists them all with one `RecoverableState.persist_many` call, which is what
one PERSIST_STATE of its event manager does. The servers are started on
loopback for the run (tests/servers.py) unless URLs are given.

Per K and store the table shows: state writes per second summed over the
workers, p50 and p99 of the persist latency (every persist of every worker),
the server's CPU (its processes' CPU time over the run's wall time, 100% = one
core), the cost per state written (server CPU microseconds), and whether it
held: every worker made every one-second tick, with no persist failing.
Nothing is asserted; the exit code only says whether the script ran.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DEFAULT_KS = (1, 4, 16)
STARTUP_GRACE = 2.0
"""Seconds the workers get to load their states before the first tick (more for large K)."""


# -- the worker (a child process) ------------------------------------------------------


def worker_main(args: argparse.Namespace) -> int:
    import anyio
    from pydantic import BaseModel

    from recoverable_state import RecoverableState, open_backend, service_locator

    class FleetState(BaseModel):
        worker: int = 0
        counter: int = 0
        cursor: str = ""
        recent: list[int] = []
        tags: dict[str, int] = {}

    async def run() -> dict[str, Any]:
        backend = open_backend(args.url)
        service_locator.set_storage(backend)
        try:
            states = [
                RecoverableState(
                    default_state=FleetState,
                    persist_state_key=f"state-{i:05d}",
                    persistence_enabled="explicit_only",
                    persist_state_kvs_name=f"fleet-{args.tag}-{args.index}",
                )
                for i in range(args.states)
            ]
            await RecoverableState.initialize_many(states)
            values = [state.current_value for state in states]
            await anyio.sleep(max(0.0, args.start_at - time.time()))
            latencies: list[float] = []
            late = 0
            failures: list[str] = []
            start = time.monotonic()
            for tick in range(args.seconds):
                for i, value in enumerate(values):
                    value.counter += 1
                    value.cursor = f"{tick}:{i}"
                    value.recent.append(tick)
                    if len(value.recent) > 5:
                        del value.recent[0]
                began = time.perf_counter()
                try:
                    await RecoverableState.persist_many(states)
                except Exception as exc:  # an ExceptionGroup too
                    failures.append(f"{type(exc).__name__}: {exc}"[:300])
                latencies.append(time.perf_counter() - began)
                wait = start + tick + 1 - time.monotonic()
                if wait < 0:
                    late += 1
                else:
                    await anyio.sleep(wait)
            elapsed = time.monotonic() - start
            for state in states:
                await state.teardown()
            return {
                "latencies": latencies,
                "late": late,
                "failures": failures,
                "elapsed": elapsed,
                "written": args.states * len(latencies),
            }
        finally:
            await backend.aclose()

    print(json.dumps(anyio.run(run)), flush=True)
    return 0


# -- the parent ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and of its children, live and reaped (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    stack = [pid]
    seen: set[int] = set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime (fields 14-17; after the name, indexes 11-14)
        total += sum(int(f) for f in fields[11:15]) / ticks
        stack.extend(_children(p))
    return total


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


@dataclass
class Result:
    store: str
    k: int
    seconds: int
    writes_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu: float | None
    """Server CPU seconds per wall second (1.0 = one core busy)."""
    cpu_us_per_write: float | None
    held: bool
    late_ticks: int
    failures: list[str]


def run_fleet(store: str, url: str, server_pid: int | None, k: int, args: argparse.Namespace) -> Result:
    tag = f"{os.getpid()}-{k}-{int(time.time())}"
    start_at = time.time() + STARTUP_GRACE + 0.25 * k * args.states / 2000
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--url",
                url,
                "--index",
                str(i),
                "--tag",
                tag,
                "--states",
                str(args.states),
                "--seconds",
                str(args.seconds),
                "--start-at",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(k)
    ]
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = cpu_seconds(server_pid) if server_pid else None
    wall_before = time.monotonic()
    outputs = [p.communicate(timeout=args.seconds * 20 + 300) for p in procs]
    wall = time.monotonic() - wall_before
    cpu_after = cpu_seconds(server_pid) if server_pid else None
    reports = []
    failures = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            failures.append(f"worker exited {proc.returncode}: {err.strip().splitlines()[-1:] or ''}")
            continue
        reports.append(json.loads(lines[-1]))
    latencies = sorted(x for r in reports for x in r["latencies"])
    written = sum(r["written"] for r in reports)
    elapsed = max((r["elapsed"] for r in reports), default=wall)
    late = sum(r["late"] for r in reports)
    failures += [f for r in reports for f in r["failures"]]
    cpu = (cpu_after - cpu_before) / wall if cpu_before is not None and cpu_after is not None else None
    return Result(
        store=store,
        k=k,
        seconds=args.seconds,
        writes_per_s=written / elapsed if elapsed else 0.0,
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p99_ms=_percentile(latencies, 0.99) * 1000,
        server_cpu=cpu,
        cpu_us_per_write=(cpu * wall / written * 1e6) if cpu is not None and written else None,
        held=not late and not failures and len(reports) == k,
        late_ticks=late,
        failures=failures[:5],
    )


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[dict[str, tuple[str, int | None]]]:
    """{store: (url, server pid or None)}: the given URLs, or servers started for the run."""
    found: dict[str, tuple[str, int | None]] = {}
    if args.redis_url:
        found["redis"] = (args.redis_url, None)
    if args.postgres_url:
        found["postgres"] = (args.postgres_url, None)
    wanted = [s for s in args.stores if s not in found]
    if not wanted:
        yield found
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import PostgresServer, RedisServer, _started

    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rs-fleet-")))
        directory.chmod(0o755)  # the postgres user must reach its data directory
        if "redis" in wanted:
            redis = stack.enter_context(_started(RedisServer, directory / "redis"))
            found["redis"] = (redis.url, redis.proc.pid if redis.proc else None)
        if "postgres" in wanted:
            postgres = stack.enter_context(_started(PostgresServer, directory / "postgres"))
            found["postgres"] = (postgres.url, postgres.proc.pid if postgres.proc else None)
        yield found


def render(results: Sequence[Result], states: int) -> str:
    headers = [
        "store",
        "K",
        "states",
        "seconds",
        "writes/s",
        "p50 (ms)",
        "p99 (ms)",
        "server CPU",
        "CPU us/write",
        "held",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.store,
                str(r.k),
                f"{r.k * states:,}",
                str(r.seconds),
                f"{r.writes_per_s:,.0f}",
                f"{r.p50_ms:,.1f}",
                f"{r.p99_ms:,.1f}",
                "-" if r.server_cpu is None else f"{r.server_cpu:.0%}",
                "-" if r.cpu_us_per_write is None else f"{r.cpu_us_per_write:.1f}",
                "yes" if r.held else f"NO ({r.late_ticks} late ticks, {len(r.failures)} failures)",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="worker counts (default 1,4,16)")
    parser.add_argument("--seconds", type=int, default=60, help="ticks per run, one a second (default 60)")
    parser.add_argument("--states", type=int, default=2000, help="states per worker (default 2000)")
    parser.add_argument("--stores", default="postgres,redis", help="default postgres,redis")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one (no CPU column)")
    parser.add_argument("--postgres-url", help="use this PostgreSQL instead of starting one (no CPU column)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    # The worker side, used by the parent only.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    args.stores = [s.strip() for s in str(args.stores).split(",") if s.strip()]
    if not args.ks or min(args.ks) < 1 or args.seconds < 1 or args.states < 1:
        parser.error("--ks, --seconds and --states must be positive")
    if set(args.stores) - {"postgres", "redis"}:
        parser.error("--stores takes postgres and/or redis")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if args.worker:
        return worker_main(args)
    results: list[Result] = []
    with servers(args) as urls:
        for store in args.stores:
            url, pid = urls[store]
            for k in args.ks:
                print(f"[fleet] {store} K={k} for {args.seconds} s", file=sys.stderr, flush=True)
                results.append(run_fleet(store, url, pid, k, args))
    print(
        f"recoverable-state fleet benchmark -- {os.cpu_count()} CPUs, {args.states:,} states per worker, "
        "each changed and persisted once a second"
    )
    print()
    print(render(results, args.states))
    notes = [f"{r.store} K={r.k}: {f}" for r in results for f in r.failures]
    if notes:
        print()
        for note in notes:
            print(f"  {note}")
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
