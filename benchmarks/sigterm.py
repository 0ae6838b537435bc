"""Time from SIGTERM to process exit, with every state persisted, on SQLite.

A child worker (this script with --child) loads N states through
`recoverable_state.run`, stores them once, then changes every one of them
without pause, so that all N are unsaved when SIGTERM comes. The parent sends
SIGTERM, times it until the process has exited (exit code 143), and checks that
the store holds exactly the values the child reported last.

Two baselines from the same run put the figure in context:
- empty worker: the same child with 0 states (signal handling, interpreter exit);
- raw SQLite: writing the same N records in one transaction with the sqlite3
  module (WAL, synchronous=FULL), in this process.

    python benchmarks/sigterm.py                 # N = 500 and 10,000, asyncio and trio
    python benchmarks/sigterm.py --smoke         # N = 50, one repetition, quick
    python benchmarks/sigterm.py --states 500 2000 --repeat 7
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BACKENDS = ("asyncio", "trio")


# -- the child -------------------------------------------------------------


def note_for(i: int, a: int) -> str:
    return f"state {i} at step {a}: " + "x" * 120


def child(states: int, backend: str, report: Path) -> None:
    import anyio.lowlevel
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
        await RecoverableState.persist_many(items)  # records exist: the last persist updates them
        print("READY", flush=True)
        try:
            while True:
                for i, item in enumerate(items):
                    value = item.current_value
                    value.a += 1
                    value.note = note_for(i, value.a)
                await anyio.lowlevel.checkpoint()
        finally:
            values = {s.persist_state_key: s.current_value.model_dump(mode="json") for s in items}
            report.write_text(json.dumps(values))  # noqa: ASYNC240 - cancelled: nothing else runs

    recoverable_state.run(main, backend=backend, persist_state_interval=3600, close_timeout=60)


# -- the parent ------------------------------------------------------------


def stored_values(db: Path) -> dict[str, Any]:
    """The records of the child's store, read with the library."""
    import anyio

    from recoverable_state import KeyValueStore, open_backend

    async def load() -> dict[str, Any]:
        backend = open_backend(f"sqlite:///{db}")
        try:
            kvs = await KeyValueStore.open(storage=backend)
            return {info.key: await kvs.get_value(info.key) for info in await kvs.list_keys()}
        finally:
            await backend.aclose()

    return anyio.run(load)


def sigterm_to_exit(states: int, backend: str, workdir: Path) -> float:
    """Seconds from SIGTERM to exit of a child with `states` unsaved states (checked)."""
    db = workdir / "state.sqlite3"
    report = workdir / "final.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECOVERABLE_STATE_")}
    env["RECOVERABLE_STATE_STORAGE_URL"] = f"sqlite:///{db}"
    log = workdir / "child.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(states), backend, str(report)],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "READY":
        proc.kill()
        raise SystemExit(f"child did not start (exit {proc.wait()}):\n{log.read_text()}")
    time.sleep(0.3)  # every state changes many times meanwhile
    guard = threading.Timer(120, proc.kill)  # a hung child ends the run, not the machine
    guard.start()
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()  # a blocking waitpid: wait(timeout) would poll every 50 ms
    elapsed = time.perf_counter() - sent
    guard.cancel()
    if code != 143:
        raise SystemExit(f"child exited with {code}, not 143:\n{log.read_text()}")
    if states:
        final = json.loads(report.read_text())
        if len(final) != states or stored_values(db) != final:
            raise SystemExit(f"{backend}, {states} states: the store does not hold the last values")
    return elapsed


def raw_sqlite_write(states: int, workdir: Path) -> float:
    """Seconds to write `states` records of the same size in one durable SQLite transaction."""
    db = workdir / "raw.sqlite3"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE records (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    rows = [(f"item-{i:05d}", json.dumps({"a": 1, "note": note_for(i, 1)}).encode()) for i in range(states)]
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO records VALUES (?, ?)", rows)
    conn.execute("COMMIT")
    rows = [(f"item-{i:05d}", json.dumps({"a": 2, "note": note_for(i, 2)}).encode()) for i in range(states)]
    start = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("UPDATE records SET value = ? WHERE key = ?", [(v, k) for k, v in rows])
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def measure(fn: Any, repeat: int, *args: Any) -> list[float]:
    figures = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="rs-sigterm-") as tmp:
            figures.append(fn(*args, Path(tmp)))
    return figures


def ms(figures: list[float]) -> str:
    median = statistics.median(figures) * 1000
    if len(figures) == 1:
        return f"{median:8.0f}"
    return f"{median:8.0f} ({min(figures) * 1000:.0f}-{max(figures) * 1000:.0f})"


def parent(sizes: list[int], repeat: int, json_path: Path | None = None) -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {repeat} runs each; median (min-max) ms")
    header = f"{'loop':8} {'states':>7} | {'SIGTERM -> exit':>22} | {'empty worker':>20} | {'raw SQLite':>14}"
    print(header)
    print("-" * len(header))
    rows: list[dict[str, object]] = []
    for backend in BACKENDS:
        empty = measure(sigterm_to_exit, repeat, 0, backend)
        for n in sizes:
            figures = measure(sigterm_to_exit, repeat, n, backend)
            raw = measure(raw_sqlite_write, repeat, n)
            print(f"{backend:8} {n:>7,} | {ms(figures):>22} | {ms(empty):>20} | {ms(raw):>14}", flush=True)
            rows.append(
                {
                    "loop": backend,
                    "n": n,
                    "sigterm_exit_time_ms": statistics.median(figures) * 1000,
                    "raw_sqlite_time_ms": statistics.median(raw) * 1000,
                    "empty_worker_ms": statistics.median(empty) * 1000,
                }
            )
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, nargs="+", default=[500, 10_000], help="state counts")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure")
    parser.add_argument("--smoke", action="store_true", help="50 states, one run: a quick check")
    parser.add_argument("--json", type=Path, help="also write the figures to this file as JSON")
    args = parser.parse_args()
    if args.smoke:
        parent([50], 1, args.json)
    else:
        parent(args.states, args.repeat, args.json)
