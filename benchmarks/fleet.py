"""Fleet benchmark: K worker processes persisting against one server setup at a time.

    python benchmarks/fleet.py                          # K = 1, 4, 16; 60 s each; every setup
    python benchmarks/fleet.py --ks 1,4,16 --seconds 20 # shorter, for a small machine
    python benchmarks/fleet.py --setups postgres,redis  # some setups only
    python benchmarks/fleet.py --smoke                  # K = 1, 2; 2 s; 200 states (< 1 min)

The setups, each started on loopback for its runs and stopped after them
(tests/servers.py, tests/fleet_servers.py):

- `sqlite`: one SQLite file per worker, run at K = 1 only: the reference for the
  worker's cost (the target: PostgreSQL's and Redis's at most 1.5x SQLite's);
- `postgres`: one PostgreSQL 15 server (`synchronous_commit=on`, fsync on);
- `pgbouncer`: the same, through PgBouncer in transaction pooling mode
  (`--pgbouncer-pool` server connections);
- `redis`: one Redis server, AOF with `appendfsync always`;
- `redis-cluster`: a Redis Cluster of 3 masters and 3 replicas, every node AOF with
  `appendfsync always` (needs the `redis+cluster://` backend).

Each worker is its own process with `--states` states (2,000 by default). Once a
second it changes every state (a counter, a cursor, a short list) and persists them
all with one `RecoverableState.persist_many` call: what one PERSIST_STATE of its
event manager does. The workers load their states first, then start together; the
measured window runs from that start until every worker has made its last tick.
A worker whose persist overran its second skips the ticks it missed.

Per setup and K the table shows: state writes per second summed over the workers;
p50 and p99 of the persist latency (every persist of every worker); the workers' own
CPU time (`time.process_time()`, all threads) per state written, in microseconds,
and that cost over SQLite's; the servers' CPU (every server process and its
children: PostgreSQL's backends, PgBouncer, all six cluster nodes) as cores busy
and per state written; the 1-minute load average when the run began; and whether
it held: every tick made on time, no persist failed. Nothing is asserted; the exit
code only says whether the script ran. Ctrl-C (or SIGTERM) stops the workers and
the servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, this directory comes first on sys.path, and benchmarks/secrets.py would
# shadow the standard library's `secrets` (redis-py's cluster client imports it: a worker
# then retried its first call for ever).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

SETUPS = ("sqlite", "postgres", "pgbouncer", "redis", "redis-cluster")
DEFAULT_KS = (1, 4, 16)
TARGET_RATIO = 1.5
"""Worker CPU per state on a server store, at most this many times SQLite's."""
READY_TIMEOUT = 600.0
"""Seconds the workers get to open the store and load their states."""


# -- the worker (a child process) ------------------------------------------------------


def worker_main(args: argparse.Namespace) -> int:
    """Load the states, say READY, wait for GO <time>, tick, report, wait for EOF, close."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: where a stuck worker is
    import anyio
    import anyio.to_thread
    from pydantic import BaseModel

    from recoverable_state import RecoverableState, open_backend, service_locator

    class FleetState(BaseModel):
        worker: int = 0
        counter: int = 0
        cursor: str = ""
        recent: list[int] = []
        tags: dict[str, int] = {}

    async def run() -> None:
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
            print("READY", flush=True)
            go = await anyio.to_thread.run_sync(sys.stdin.readline)
            await anyio.sleep(max(0.0, float(go.split()[1]) - time.time()))
            latencies: list[float] = []
            failures: list[str] = []
            late = skipped = 0
            cpu_began = time.process_time()
            start = time.monotonic()
            tick = 0
            while tick < args.seconds:
                for i, value in enumerate(values):
                    value.worker = args.index
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
                now = time.monotonic() - start
                if now <= tick + 1:
                    await anyio.sleep(tick + 1 - now)
                    tick += 1
                else:  # overran its second: the ticks whose time went by are not made
                    late += 1
                    skipped += int(now) - (tick + 1)
                    tick = int(now)
            elapsed = time.monotonic() - start
            report = {
                "latencies": latencies,
                "late": late,
                "skipped": skipped,
                "failures": failures,
                "elapsed": elapsed,
                "cpu": time.process_time() - cpu_began,
                "written": args.states * len(latencies),
            }
            print(json.dumps(report), flush=True)
            # Close only once every worker is done, so that no teardown runs inside
            # another worker's measured window.
            await anyio.to_thread.run_sync(sys.stdin.read)
            for state in states:
                await state.teardown()
        finally:
            await backend.aclose()

    anyio.run(run)
    return 0


# -- CPU of server processes ------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds of it and its reaped children)} of every process (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state, ppid, ...; utime, stime, cutime, cstime at indexes 11-14
        table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / ticks)
    return table


def cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds of the processes `roots` and all their descendants, live and reaped."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    stack = list(roots)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


# -- the parent ------------------------------------------------------------------------


@dataclass
class Result:
    setup: str
    k: int
    states: int
    seconds: float
    """The measured window: from the common start until every worker's last tick."""
    load1: float
    writes_per_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    worker_us_per_state: float | None = None
    server_cores: float | None = None
    """Server CPU seconds per wall second (1.0 = one core busy); None: no server."""
    server_us_per_state: float | None = None
    held: bool = False
    late: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    unavailable: str | None = None


@dataclass
class Setup:
    """A running setup: the URL a worker opens (`{worker}` is replaced by its index) and the servers' pids."""

    url: str
    server_pids: list[int]
    note: str = ""


class _Worker:
    def __init__(self, proc: subprocess.Popen[str], stderr: IO[str]) -> None:
        self.proc = proc
        self.stderr = stderr

    def line(self, starts: str) -> str | None:
        """The next stdout line that starts with `starts` (None: the worker ended first)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(starts):
                return line
        return None

    def why(self) -> str:
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        return f"worker exited {self.proc.poll()}: {lines[-1] if lines else 'no output'}"[:300]


def run_fleet(name: str, setup: Setup, k: int, states: int, seconds: int, directory: Path) -> Result:
    result = Result(setup=name, k=k, states=states, seconds=float(seconds), load1=os.getloadavg()[0])
    tag = f"{os.getpid()}-{k}-{int(time.time())}"
    workers: list[_Worker] = []
    try:
        for i in range(k):
            stderr = tempfile.TemporaryFile("w+", dir=directory)  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    "--url",
                    setup.url.replace("{worker}", f"{tag}-{i}"),
                    "--index",
                    str(i),
                    "--tag",
                    tag,
                    "--states",
                    str(states),
                    "--seconds",
                    str(seconds),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            workers.append(_Worker(proc, stderr))
        ready = [w for w in workers if w.line("READY") is not None]
        result.failures += [w.why() for w in workers if w not in ready]
        start_at = time.time() + 0.2
        for w in ready:
            assert w.proc.stdin is not None
            w.proc.stdin.write(f"GO {start_at}\n")
            w.proc.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = cpu_seconds(setup.server_pids) if setup.server_pids else None
        began = time.monotonic()
        reports = []
        for w in ready:
            line = w.line("{")
            if line is None:
                result.failures.append(w.why())
            else:
                reports.append(json.loads(line))
        window = time.monotonic() - began
        cpu_after = cpu_seconds(setup.server_pids) if setup.server_pids else None
        for w in workers:
            if w.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    w.proc.stdin.close()
        for w in workers:
            try:
                w.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            w.stderr.close()
    latencies = sorted(x for r in reports for x in r["latencies"])
    written = sum(r["written"] for r in reports)
    result.seconds = window
    result.writes_per_s = written / window if window else 0.0
    if latencies:
        result.p50_ms = statistics.median(latencies) * 1000
        result.p99_ms = _percentile(latencies, 0.99) * 1000
    if written:
        result.worker_us_per_state = sum(r["cpu"] for r in reports) / written * 1e6
        if cpu_before is not None and cpu_after is not None:
            result.server_cores = (cpu_after - cpu_before) / window
            result.server_us_per_state = (cpu_after - cpu_before) / written * 1e6
    result.late = sum(r["late"] for r in reports)
    result.skipped = sum(r["skipped"] for r in reports)
    result.failures += [f for r in reports for f in r["failures"]]
    result.held = not result.late and not result.failures and len(reports) == k
    return result


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@contextlib.contextmanager
def started(name: str, directory: Path, pgbouncer_pool: int) -> Iterator[Setup]:
    """Start the servers of setup `name` in `directory`; stop them on exit (also on failure).

    Raises `servers.ServerUnavailable` (a binary missing, or no Redis Cluster backend).
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from fleet_servers import PgBouncerServer, RedisClusterServer
    from servers import PostgresServer, RedisServer, ServerUnavailable

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the postgres user must reach its data directory inside
    with contextlib.ExitStack() as stack:

        def start(server: Any) -> Any:
            stack.callback(server.stop)  # before start(): a half-started server is stopped too
            server.start()
            return server

        if name == "sqlite":
            (directory / "sqlite").mkdir()
            yield Setup(f"sqlite:///{directory / 'sqlite'}/worker-{{worker}}.db", [])
        elif name == "postgres":
            postgres = start(PostgresServer(directory / "postgres"))
            yield Setup(postgres.url, [postgres.proc.pid])
        elif name == "pgbouncer":
            postgres = start(PostgresServer(directory / "postgres"))
            bouncer = start(PgBouncerServer(directory / "pgbouncer", postgres, pool_size=pgbouncer_pool))
            yield Setup(bouncer.url, [postgres.proc.pid, bouncer.proc.pid], f"pool_size {pgbouncer_pool}")
        elif name == "redis":
            redis = start(RedisServer(directory / "redis"))
            yield Setup(redis.url, [redis.proc.pid])
        elif name == "redis-cluster":
            from importlib.metadata import entry_points

            if not any(e.name == "redis+cluster" for e in entry_points(group="recoverable_state.backends")):
                raise ServerUnavailable("no redis+cluster:// backend in this install (not merged yet?)")
            cluster = start(RedisClusterServer(directory / "cluster"))
            yield Setup(cluster.url, [node.proc.pid for node in cluster.nodes], "3 masters + 3 replicas")
        else:
            raise ValueError(name)


def render(results: Sequence[Result]) -> str:
    reference = _sqlite_reference(results)
    headers = [
        "setup",
        "K",
        "states",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "worker us/state",
        "x SQLite",
        "server cores",
        "server us/state",
        "load1",
        "held",
    ]
    rows = []
    for r in results:
        if r.unavailable is not None:
            rows.append([r.setup, str(r.k), "-", f"not available: {r.unavailable}"])
            continue
        ratio = (
            f"{r.worker_us_per_state / reference:.2f}"
            if reference and r.worker_us_per_state is not None and r.setup != "sqlite"
            else "-"
        )
        rows.append(
            [
                r.setup,
                str(r.k),
                f"{r.k * r.states:,}",
                f"{r.writes_per_s:,.0f}",
                f"{r.p50_ms:,.1f}",
                f"{r.p99_ms:,.1f}",
                _num(r.worker_us_per_state),
                ratio,
                "-" if r.server_cores is None else f"{r.server_cores:.2f}",
                _num(r.server_us_per_state),
                f"{r.load1:.2f}",
                "yes"
                if r.held
                else f"NO ({r.late} late, {r.skipped} skipped ticks, {len(r.failures)} failed)",
            ]
        )
    full = [row for row in rows if len(row) == len(headers)]
    widths = [max(len(h), *(len(row[i]) for row in full)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _sqlite_reference(results: Sequence[Result]) -> float | None:
    return next(
        (r.worker_us_per_state for r in results if r.setup == "sqlite" and r.k == 1),
        None,
    )


def verdicts(results: Sequence[Result]) -> list[str]:
    """The target at K = 1, and how the cost per state moves from the smallest K to the largest."""
    lines = []
    reference = _sqlite_reference(results)
    if reference:
        lines.append(
            f"target: worker CPU per state at most {TARGET_RATIO}x SQLite's "
            f"(SQLite K=1: {reference:,.1f} us/state)"
        )
        for r in results:
            if r.k == 1 and r.setup != "sqlite" and r.worker_us_per_state is not None:
                ratio = r.worker_us_per_state / reference
                verdict = "met" if ratio <= TARGET_RATIO else "missed"
                cost = f"{r.worker_us_per_state:,.1f} us/state"
                lines.append(f"  {r.setup:<14} K=1: {cost} = {ratio:.2f}x  {verdict}")
    for setup in dict.fromkeys(r.setup for r in results):
        runs = [r for r in results if r.setup == setup and r.worker_us_per_state is not None]
        if len(runs) < 2:
            continue
        first, last = min(runs, key=lambda r: r.k), max(runs, key=lambda r: r.k)
        parts = [f"worker {last.worker_us_per_state / first.worker_us_per_state:.2f}x"]  # type: ignore[operator]
        if first.server_us_per_state and last.server_us_per_state:
            parts.append(f"server {last.server_us_per_state / first.server_us_per_state:.2f}x")
        lines.append(f"cost per state, {setup} K={last.k} over K={first.k}: " + ", ".join(parts))
    return lines


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="worker counts (default 1,4,16)")
    parser.add_argument("--seconds", type=int, default=60, help="ticks per run, one a second (default 60)")
    parser.add_argument("--states", type=int, default=2000, help="states per worker (default 2000)")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"default {','.join(SETUPS)}")
    parser.add_argument("--pgbouncer-pool", type=int, default=8, help="PgBouncer's default_pool_size (8)")
    parser.add_argument("--smoke", action="store_true", help="K = 1, 2; 2 s; 200 states: a quick check")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    # The worker side, used by the parent only.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.ks, args.seconds, args.states = "1,2", 2, 200
    args.ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    args.setups = [s.strip() for s in str(args.setups).split(",") if s.strip()]
    if not args.ks or min(args.ks) < 1 or args.seconds < 1 or args.states < 1:
        parser.error("--ks, --seconds and --states must be positive")
    if unknown := set(args.setups) - set(SETUPS):
        parser.error(f"unknown setups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if args.worker:
        return worker_main(args)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the workers and the servers, as Ctrl-C does
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import ServerUnavailable

    began = datetime.now(UTC)
    load_before = os.getloadavg()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="rs-fleet-") as tmp:
        Path(tmp).chmod(0o755)  # the postgres user must reach the data directories inside
        for name in args.setups:
            ks = [1] if name == "sqlite" else args.ks
            try:
                with started(name, Path(tmp) / name, args.pgbouncer_pool) as setup:
                    for k in ks:
                        print(f"[fleet] {name} K={k} for {args.seconds} s", file=sys.stderr, flush=True)
                        results.append(run_fleet(name, setup, k, args.states, args.seconds, Path(tmp)))
            except ServerUnavailable as exc:
                print(f"[fleet] {name}: not available: {exc}", file=sys.stderr, flush=True)
                results += [
                    Result(setup=name, k=k, states=args.states, seconds=0, load1=0, unavailable=str(exc))
                    for k in ks[:1]
                ]
    load_after = os.getloadavg()
    print(
        f"recoverable-state fleet benchmark, {began:%Y-%m-%d %H:%M} UTC: {os.cpu_count()} CPUs, "
        f"{args.states:,} states per worker, each changed and persisted once a second for {args.seconds} s"
    )
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after "
        + ", ".join(f"{x:.2f}" for x in load_after)
    )
    print()
    print(render(results))
    print()
    for line in verdicts(results):
        print(line)
    notes = [f"{r.setup} K={r.k}: {f}" for r in results for f in r.failures[:3]]
    if notes:
        print()
        for note in notes:
            print(f"  {note}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
