"""Soak: do memory, file descriptors and threads stay flat while states persist for minutes?

A child worker (this script with --child) runs N states under
`recoverable_state.run` on a SQLite store in a temporary directory, persisting
every 0.2 s while it changes them without pause. The parent samples the
child's resident memory, open file descriptors and threads once a second
(from /proc, so Linux only), drops the warm-up, fits a line through the rest
and prints each slope per minute with a verdict, "flat" or "growing". At the
end it sends SIGTERM and checks the child exits with 143.

With --load, another process spins on a CPU core for the whole run, as a
neighbour on a shared machine would.

    python benchmarks/soak.py                        # 2,000 states, 300 s, asyncio and trio
    python benchmarks/soak.py --seconds 60 --backend trio --load
    python benchmarks/soak.py --smoke                # a few seconds, to see that it runs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("asyncio", "trio")

# A slope per minute at or under these is "flat".
FLAT_RSS_MB_PER_MIN = 1.0
FLAT_FDS_PER_MIN = 0.5
FLAT_THREADS_PER_MIN = 0.5


# -- the child -------------------------------------------------------------


def child(states: int, interval: float, backend: str) -> None:
    import anyio
    from pydantic import BaseModel

    import recoverable_state
    from recoverable_state import RecoverableState

    class Item(BaseModel):
        a: int = 0
        note: str = ""

    async def main() -> None:
        items = [
            RecoverableState(default_state=Item(), persist_state_key=key, persistence_enabled=True)
            for key in (f"item-{i:05d}" for i in range(states))
        ]
        await RecoverableState.initialize_many(items)
        print("READY", flush=True)
        step = 0
        while True:
            step += 1
            # A tenth of the states change each round, so every persist has work to do.
            for item in items[step % 10 :: 10]:
                item.current_value.a += 1
                item.current_value.note = f"step {step}"
            await anyio.sleep(0.01)

    recoverable_state.run(main, backend=backend, persist_state_interval=interval, close_timeout=25)


# -- the parent ------------------------------------------------------------


def sample(pid: int) -> tuple[float, int, int]:
    """(RSS in MB, open fds, threads) of process `pid`."""
    rss_kb = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kb / 1024, fds, threads


def slope_per_minute(times: list[float], values: list[float]) -> float:
    """The least-squares slope of `values` over `times` (seconds), per minute."""
    if len(times) < 2:
        return 0.0
    return statistics.linear_regression(times, values).slope * 60


def spin(stop_at: float) -> None:
    """Keep a CPU core busy until `stop_at` (time.time())."""
    while time.time() < stop_at:
        pass


def soak(backend: str, states: int, seconds: float, warmup: float, interval: float, load: bool) -> bool:
    """Run one child for `seconds`; print its slopes; return whether all are flat."""
    with tempfile.TemporaryDirectory(prefix="rs-soak-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECOVERABLE_STATE_")}
        env["RECOVERABLE_STATE_STORAGE_URL"] = f"sqlite:///{Path(tmp) / 'state.sqlite3'}"
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "--backend",
                backend,
                "--states",
                str(states),
                "--interval",
                str(interval),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            proc.kill()
            raise SystemExit(f"{backend}: the child did not start (exit {proc.wait()})")
        neighbour = None
        if load:
            neighbour = multiprocessing.Process(target=spin, args=(time.time() + seconds,), daemon=True)
            neighbour.start()
        start = time.monotonic()
        times: list[float] = []
        rss: list[float] = []
        fds: list[float] = []
        threads: list[float] = []
        while (now := time.monotonic() - start) < seconds:
            if proc.poll() is not None:
                raise SystemExit(f"{backend}: the child ended early (exit {proc.returncode})")
            if now >= warmup:
                r, f, t = sample(proc.pid)
                times.append(now)
                rss.append(r)
                fds.append(f)
                threads.append(t)
            time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        if neighbour is not None:
            neighbour.terminate()
        figures = [
            ("RSS MB", rss, slope_per_minute(times, rss), FLAT_RSS_MB_PER_MIN),
            ("open fds", fds, slope_per_minute(times, fds), FLAT_FDS_PER_MIN),
            ("threads", threads, slope_per_minute(times, threads), FLAT_THREADS_PER_MIN),
        ]
        all_flat = True
        print(f"\n{backend}: {states} states, every {interval} s, {seconds:.0f} s ({warmup:.0f} s warm-up)")
        print(f"  {'figure':<10} {'first':>9} {'last':>9} {'max':>9} {'slope/min':>10}  verdict")
        for name, values, slope, limit in figures:
            flat = abs(slope) <= limit
            all_flat = all_flat and flat
            first, last, top = (values[0], values[-1], max(values)) if values else (0.0, 0.0, 0.0)
            verdict = "flat" if flat else "growing"
            print(f"  {name:<10} {first:>9.1f} {last:>9.1f} {top:>9.1f} {slope:>10.3f}  {verdict}")
        print(f"  exit code after SIGTERM: {code} ({'ok' if code == 143 else 'expected 143'})")
        return all_flat and code == 143


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    parser.add_argument("--states", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=300.0, help="how long each soak runs")
    parser.add_argument("--warmup", type=float, default=None, help="seconds left out (default: a fifth)")
    parser.add_argument("--interval", type=float, default=0.2, help="PERSIST_STATE interval in seconds")
    parser.add_argument("--load", action="store_true", help="a neighbour process spins on a core meanwhile")
    parser.add_argument("--smoke", action="store_true", help="200 states for 6 s: does it run at all")
    opts = parser.parse_args()
    if opts.child:
        child(opts.states, opts.interval, opts.backend)
        return
    if opts.smoke:
        opts.states, opts.seconds = 200, 6.0
    warmup = opts.warmup if opts.warmup is not None else opts.seconds / 5
    backends = BACKENDS if opts.backend == "both" else (opts.backend,)
    results = [soak(b, opts.states, opts.seconds, warmup, opts.interval, opts.load) for b in backends]
    print("\nverdict:", "flat" if all(results) else "growing")
    if not opts.smoke and not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
