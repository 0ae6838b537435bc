"""A big state where little changes: a tick written as a delta against the whole state, in fresh processes.

    python benchmarks/deltas.py                 # the 25 MB state, medians of 5, both loops, SQLite
    python benchmarks/deltas.py --smoke         # a 250 kB state, one run of each (CI)
    python benchmarks/deltas.py --store file    # the file store (the raw read stays sqlite3's)
    python benchmarks/deltas.py --url redis://127.0.0.1:6379/0   # report another store (no raw baseline)

The state (`_deltas_child.Crawl`) is a dict of 1,000,000 URLs and a list of
100,000 log lines, about 25 MB of JSON; a tick sets 200 entries and appends 20
lines. Setup writes it once, then 50 ticks of deltas (so a cold start replays a
chain). Each measurement is a child process of its own on a fresh copy of that
store: it times its cold start (from after its imports to the value in hand),
then 10 ticks, each timed from the persist's call to its return (durable),
with this process's write_bytes (/proc/self/io) counted over the ticks and a
task sleeping 1 ms beside them (its longest wait is the heartbeat), and the
size of SQLite's -wal file after them. (A big state's memory while it persists
is tests/storage/test_big_values.py's: measured after a cold start, the peak
reads low where the allocator reuses what the load freed.) The
systems: the library with deltas (the default) and with `deltas=False` (every
persist writes the whole state), on asyncio and trio, and the raw read of the
same JSON (sqlite3 SELECT and json.loads). The timings are never asserted; the
exit code is 1 only when a child failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_deltas_child.py"
TICK_SPEEDUP_TARGET = 50.0
BYTES_PER_TICK_TARGET = 2 * 1024 * 1024
WAL_TARGET = 3.0  # the -wal file after the ticks, in JSONs of the state (the largest batch)
COLD_TARGET = 1.5
HEARTBEAT_TARGET_MS = 20.0


def child(args: Sequence[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(CHILD), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def fresh(template: Path, into: Path) -> Path:
    """A copy of the store's files: a file store's directory, or the database and its -wal / -shm."""
    if into.exists():
        shutil.rmtree(into)
    if template.is_dir():
        shutil.copytree(template, into / template.name, symlinks=True)
        return into / template.name
    into.mkdir(parents=True)
    for path in template.parent.glob(template.name + "*"):
        shutil.copy2(path, into / path.name)
    return into / template.name


def url_of(store: str, path: Path) -> str:
    return f"file://{path}" if store == "file" else f"sqlite:///{path}"


def measure(
    args: argparse.Namespace, tmp: Path, env: dict[str, str]
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    template = tmp / "template" / ("files" if args.store == "file" else "state.sqlite3")
    template.parent.mkdir()
    raw_db = tmp / "raw.sqlite3"
    url = args.url or url_of(args.store, template)
    made = child(["setup", url, str(raw_db), str(args.setup_ticks)], env, args.timeout)
    systems = [(f"deltas-{loop}", loop, "1") for loop in args.loops] + [
        (f"whole-{loop}", loop, "0") for loop in args.loops
    ]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in systems}
    if not args.url:
        samples["raw"] = []
    for rep in range(args.repeat):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        for name, loop, deltas in order:
            target = url if args.url else url_of(args.store, fresh(template, tmp / "run"))
            print(f"  rep {rep + 1}/{args.repeat}: {name}", file=sys.stderr, flush=True)
            samples[name].append(child(["lib", target, loop, str(args.ticks), deltas], env, args.timeout))
        if not args.url:
            samples["raw"].append(child(["raw", str(raw_db)], env, args.timeout))
    return samples, int(made["json_bytes"])


def median(rows: list[dict[str, Any]], figure: str) -> float:
    return statistics.median(r[figure] for r in rows)


def report(
    samples: dict[str, list[dict[str, Any]]], loops: Sequence[str], json_bytes: int
) -> tuple[str, list[str]]:
    lines = [f"state: {json_bytes / 1e6:.1f} MB of JSON", ""]
    lines.append(
        f"{'system':<16}{'cold start ms':>15}{'tick ms':>10}{'bytes/tick':>14}{'heartbeat ms':>14}"
        f"{'WAL MB':>9}  stored as"
    )
    for name, rows in samples.items():
        if name == "raw":
            lines.append(f"{'raw read':<16}{median(rows, 'cold_ms'):>15.1f}")
            continue
        lines.append(
            f"{name:<16}{median(rows, 'cold_ms'):>15.1f}{median(rows, 'tick_ms'):>10.1f}"
            f"{median(rows, 'bytes_per_tick'):>14,.0f}{max(r['heartbeat_ms'] for r in rows):>14.1f}"
            f"{_wal_mb(rows):>9}"
            f"  {rows[0]['stored_as']}"
        )
    verdicts = []
    for loop in loops:
        d, w = samples[f"deltas-{loop}"], samples[f"whole-{loop}"]
        speedup = median(w, "tick_ms") / median(d, "tick_ms")
        verdicts.append(
            _verdict(
                f"{loop}: a tick as a delta, times faster than whole", speedup, TICK_SPEEDUP_TARGET, "ge"
            )
        )
        per_tick = median(d, "bytes_per_tick") / 1e6
        verdicts.append(
            _verdict(f"{loop}: MB reaching the disk per tick", per_tick, BYTES_PER_TICK_TARGET / 1e6, "le")
        )
        beat = max(r["heartbeat_ms"] for r in d)
        verdicts.append(
            _verdict(f"{loop}: longest heartbeat wait during ticks, ms", beat, HEARTBEAT_TARGET_MS, "le")
        )
        if all(r["wal_bytes"] is not None for r in w + d):  # a SQLite store
            wal = max(r["wal_bytes"] for r in w + d) / json_bytes
            verdicts.append(_verdict(f"{loop}: the WAL after the ticks / JSON", wal, WAL_TARGET, "le"))
        if "raw" in samples:
            cold = median(d, "cold_ms") / median(samples["raw"], "cold_ms")
            verdicts.append(
                _verdict(f"{loop}: cold start (snapshot + deltas) / raw read", cold, COLD_TARGET, "le")
            )
    return "\n".join(lines), verdicts


def _wal_mb(rows: list[dict[str, Any]]) -> str:
    """The largest -wal file of these runs, in MB ("-" for a store that is not SQLite)."""
    sizes = [r["wal_bytes"] for r in rows]
    return "-" if None in sizes else f"{max(sizes) / 1e6:.1f}"


def _verdict(what: str, value: float, limit: float, how: str) -> str:
    met = value >= limit if how == "ge" else value <= limit
    sign = ">=" if how == "ge" else "<="
    return f"{what:<58}{value:>9.2f}  (target {sign} {limit:g}): {'met' if met else 'missed'}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a small state, one run of each")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--setup-ticks", type=int, default=50)
    parser.add_argument("--loops", nargs="+", default=["asyncio", "trio"])
    parser.add_argument(
        "--store", choices=["sqlite", "file"], default="sqlite", help="the store copied for each run"
    )
    parser.add_argument(
        "--url", default=None, help="a store other than a fresh SQLite file (reported, no raw baseline)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tmp-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.smoke:
        args.repeat, args.ticks, args.setup_ticks = 1, 3, 5
        env["DELTAS_BENCH_SCALE"] = "0.01"
    with tempfile.TemporaryDirectory(prefix="rs-deltas-bench-", dir=args.tmp_dir) as tmp:
        try:
            samples, json_bytes = measure(args, Path(tmp), env)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"a measurement failed: {exc}", file=sys.stderr)
            return 1
    text, verdicts = report(samples, args.loops, json_bytes)
    where = f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"benchmarks/deltas.py on {args.url or args.store}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {where}"
    )
    print(f"medians of {args.repeat}; each figure from a fresh process\n")
    print(text + "\n")
    print("\n".join(verdicts))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"samples": samples, "verdicts": verdicts, "json_bytes": json_bytes}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
