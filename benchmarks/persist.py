"""What a worker pays: the library against raw sqlite3, diskcache and LangGraph, each in a fresh process.

    python benchmarks/persist.py                   # N = 10,000 and 100,000, medians of 5
    python benchmarks/persist.py --smoke           # tiny N, one run of each, a few seconds (CI)
    python benchmarks/persist.py --n 10k --repeat 7 --json out.json
    python benchmarks/persist.py --profile-only --profile prof/   # cProfile one child of 10,000 states
    python benchmarks/persist.py --store postgres --n 10k      # the library against psycopg
    python benchmarks/persist.py --store redis --smoke        # ... against redis-py

Every measurement is a child process of its own (`_worker_child.py`), started
on a fresh copy of the data its system stored (as a worker starts after a
deploy), and the systems take turns within each repetition, in a rotating
order. Each child times its cold start (from after its imports to every
state's value in hand), then a persist with every state changed and one with
1% changed (from the emit, or the first write, to every write durable). The
heartbeat children run the library's cold start, then its first persist with a
task sleeping 1 ms in a loop beside it. Nothing touches the garbage collector.

`--store postgres|redis` measures the same on a throwaway server on loopback
that the script starts and stops (`tests/servers.py`): the library (asyncio,
trio) against the server's raw client doing the same work in one round trip
(`_worker_raw_servers.py`), each child on a fresh database of its own
(`_worker_servers.py` says how); diskcache, LangGraph and the heartbeat job are
SQLite-only. Its targets: persist-all and cold start at most 1.5x raw, with the
worker's CPU time per state beside them.

The table gives medians and the 1-minute load average seen as each row's
children started; the targets below it come from the design (issue 22). The
exit code is 1 when a child failed (crashed, hung, or did not check out); the
timings themselves are never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _worker_report import (  # noqa: E402
    RAW_LABELS,
    Job,
    Sample,
    per_state_table,
    render_verdicts,
    server_verdicts,
    table,
    verdicts,
)
from _worker_servers import STORES, ServerUnavailable, Store, open_store  # noqa: E402

CHILD = HERE / "_worker_child.py"
SMOKE_N = 200
LANGGRAPH_MAX_N = 10_000
"""LangGraph commits every state on its own: 100,000 puts take minutes a run."""


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def jobs_for(n: int, loops: Sequence[str], others: Sequence[str], store: str = "sqlite") -> list[Job]:
    """The children of one N; a server store has the library and the raw client only (no heartbeat)."""
    if store != "sqlite":
        return [Job("ours", loop, store=store) for loop in loops] + [Job("raw", store=store)]
    jobs = [Job("ours", loop) for loop in loops] + [Job("raw")]
    jobs += [Job(name) for name in others if name != "langgraph" or n <= LANGGRAPH_MAX_N]
    return jobs + [Job("ours", loop, heartbeat=True) for loop in loops]


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_child(job: Job, n: int, rep: int, root: Path, timeout: float, store: Store) -> Sample:
    """One measurement in a fresh process; a crash, a hang or a bad answer becomes the sample's error."""
    sample = Sample(job, n, rep, load_average())
    work = root / f"run-{job.system}-{job.loop}-{int(job.heartbeat)}-{n}-{rep}"
    command = [sys.executable, str(CHILD), job.system, str(n), str(work)]
    if job.loop is not None:
        command += ["--loop", job.loop]
    if job.heartbeat:
        command.append("--heartbeat")
    started = time.perf_counter()
    try:
        with store.fresh(job.system, n, work) as extra:
            sample.load = load_average()
            done = subprocess.run(
                [*command, *extra], capture_output=True, text=True, timeout=timeout, cwd=HERE
            )
        results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not results:
            sample.error = f"exit code {done.returncode}; stderr:\n{tail(done.stderr) or '(empty)'}"
        else:
            sample.figures = json.loads(results[-1][len("RESULT ") :])
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        sample.error = f"hung: killed after {timeout:g} s; stderr:\n{tail(stderr) or '(empty)'}"
    except Exception as exc:  # the setup of this one sample failed: report it, go on
        sample.error = f"{type(exc).__name__}: {exc}"
    sample.seconds = time.perf_counter() - started
    if sample.error is not None:
        progress(f"  {job.label} N={n} rep {rep + 1}: FAILED: {sample.error.splitlines()[0]}")
    else:
        figures = ", ".join(f"{k} {v * 1000:.1f}" for k, v in sample.figures.items())
        progress(f"  {job.label:<17} {figures} ms (load {sample.load:.2f}, {sample.seconds:.1f} s)")
    return sample


def measure(args: argparse.Namespace, root: Path, others: Sequence[str], store: Store) -> list[Sample]:
    """Every job at every N, `repeat` times, interleaved; in parallel only in a smoke run."""
    samples: list[Sample] = []
    run = partial(run_child, root=root, store=store)
    for n in args.n:
        jobs = jobs_for(n, args.loops, others, store.name)
        progress(f"N={n:,}: {store.name} templates for {', '.join(sorted({j.system for j in jobs}))}")
        for system in sorted({j.system for j in jobs}):
            store.template(system, n)
        timeout = args.timeout or max(120.0, n * 0.003)
        for rep in range(args.repeat):
            order = jobs[rep % len(jobs) :] + jobs[: rep % len(jobs)]
            progress(f"N={n:,} rep {rep + 1}/{args.repeat}: {', '.join(j.label for j in order)}")
            if args.smoke and store.parallel:  # timings are not looked at: the children may share the CPUs
                with ThreadPoolExecutor(3) as pool:
                    samples += pool.map(partial(run, n=n, rep=rep, timeout=timeout), order)
            else:
                samples += [run(job, n=n, rep=rep, timeout=timeout) for job in order]
    return samples


def machine() -> dict[str, Any]:
    try:
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    return {
        "revision": revision or "unknown",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def on_tmpfs(path: Path) -> bool:
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    resolved, best, kind = str(path.resolve()), "", ""
    for parts in mounts:
        inside = len(parts) >= 3 and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/"))
        if inside and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind == "tmpfs"


# -- profiling --------------------------------------------------------------------------


def profile_phases(directory: Path, root: Path, n: int, loop: str, top: int, store: Store) -> str:
    """cProfile the library's cold start, persist-all and 1% persist of `n` states in a child (main
    thread only: the store's own thread shows as waits); the top functions of each, as text."""
    import io
    import pstats

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / f"ours-{store.name}-{loop}-{n}"
    work = root / f"profile-{loop}-{n}"
    with store.fresh("ours", n, work) as extra:
        command = [sys.executable, str(CHILD), "ours", str(n), str(work), "--loop", loop, *extra]
        done = subprocess.run(
            [*command, "--profile", str(prefix)],
            capture_output=True,
            text=True,
            timeout=max(120.0, n * 0.003),
        )
    if done.returncode != 0:
        raise RuntimeError(f"the profiled child failed:\n{tail(done.stderr)}")
    out = io.StringIO()
    for name in ("cold", "persist_all", "persist_1pct"):
        path = prefix.with_name(f"{prefix.name}-{name}.prof")
        stats = pstats.Stats(str(path), stream=out).strip_dirs()
        out.write(f"cProfile of {name}, ours {loop} on {store.name}, N={n:,} ({path}), by own time:\n")
        stats.sort_stats("tottime").print_stats(top)
        out.write(f"{name}, by cumulative time:\n")
        stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# -- the command line -------------------------------------------------------------------


def parse_ns(text: str) -> list[int]:
    ns = []
    for part in text.lower().replace("_", "").split(","):
        part = part.strip()
        if part:
            ns.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
    if not ns or min(ns) < 1:
        raise argparse.ArgumentTypeError("give positive counts, such as 10000,100000 or 10k,100k")
    return sorted(set(ns))


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=parse_ns, help="state counts (default 10k,100k; smoke: 200)")
    parser.add_argument("--repeat", type=int, help="fresh processes per system and N (default 5; smoke: 1)")
    parser.add_argument("--loops", default="asyncio,trio", help="the library's event loops (default both)")
    parser.add_argument(
        "--store", choices=STORES, default="sqlite", help="where the data lives (servers: started here)"
    )
    parser.add_argument("--without", default="", help="leave out comparisons: diskcache,langgraph")
    parser.add_argument(
        "--smoke", action="store_true", help=f"N={SMOKE_N}, one run each: checks that all run"
    )
    parser.add_argument("--timeout", type=float, help="seconds a child may take (default from N)")
    parser.add_argument("--tmp-dir", type=Path, help="where the data lives (default: the system temp dir)")
    parser.add_argument("--json", type=Path, help="also write every sample as JSON here")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="cProfile the phases of one library child into DIR"
    )
    parser.add_argument("--profile-n", type=int, default=10_000, help="states in the profiled cold start")
    parser.add_argument("--profile-only", action="store_true", help="only the profile, no measurements")
    args = parser.parse_args(argv)
    args.n = args.n or ([SMOKE_N] if args.smoke else [10_000, 100_000])
    args.repeat = args.repeat or (1 if args.smoke else 5)
    args.loops = [loop.strip() for loop in args.loops.split(",") if loop.strip()]
    if not args.loops or set(args.loops) - {"asyncio", "trio"} or args.repeat < 1:
        parser.error("--loops takes asyncio and/or trio; --repeat at least 1")
    if args.profile_only and args.profile is None:
        args.profile = Path("benchmark-profiles")
    return args


def comparisons(args: argparse.Namespace, notes: list[str]) -> list[str]:
    """The SQLite-only systems to measure beside raw sqlite3 (those installed and not left out)."""
    without = {name.strip() for name in args.without.split(",")}
    others = [name for name in ("diskcache", "langgraph") if name not in without]
    if args.store != "sqlite":
        notes.append(
            f"{args.store}: the library and the raw client only (diskcache and LangGraph are SQLite-only); "
            "the heartbeat job is not run on a server store"
        )
        return []
    for name, module, package in (
        ("diskcache", "diskcache", "diskcache"),
        ("langgraph", "langgraph.checkpoint.sqlite", "langgraph-checkpoint-sqlite"),
    ):
        if name in others and not available(module):
            others.remove(name)
            notes.append(f"{name}: not installed (`.venv/bin/pip install {package}` adds its column)")
    if "langgraph" in others and max(args.n) > LANGGRAPH_MAX_N:
        notes.append(f"LangGraph measured up to N={LANGGRAPH_MAX_N:,} (one commit per state)")
    return others


def collect(
    args: argparse.Namespace, others: list[str], notes: list[str]
) -> tuple[list[Sample], str, str | None]:
    """The samples, the store's description and the profile's text, the store's server (if any) stopped."""
    if args.tmp_dir is not None:
        args.tmp_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        root = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="rs-worker-bench-", dir=args.tmp_dir))
        )
        if on_tmpfs(root):
            notes.append(f"{root} is on tmpfs: fsync costs nothing there; give --tmp-dir on a real disk")
        if args.store != "sqlite":
            progress(f"starting a throwaway {args.store} server on loopback in {root}")
        store = open_store(args.store, root, stack)
        if args.store != "sqlite":
            progress(f"{args.store} server listening on 127.0.0.1:{store.port}")
        described = store.describe()
        samples = [] if args.profile_only else measure(args, root, others, store)
        profile = None
        if args.profile is not None:
            progress(f"profiling a cold start and two persists of {args.profile_n:,} states")
            profile = profile_phases(args.profile, root, args.profile_n, args.loops[0], 25, store)
    return samples, described, profile


def report(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    samples: list[Sample],
    described: str,
    others: list[str],
) -> None:
    info = machine()
    labels = [f"ours {loop}" for loop in args.loops] + [RAW_LABELS[args.store]]
    labels += [{"diskcache": "diskcache", "langgraph": "LangGraph"}[name] for name in others]
    print(
        f"recoverable-state worker benchmark at {info['revision']}, {info['date']} -- Python "
        f"{info['python']}, {info['cpus']} CPUs, {described}, {info['platform']}"
    )
    print(
        f"command: {' '.join(['python', 'benchmarks/persist.py', *(argv or sys.argv[1:])])}; "
        f"medians of {args.repeat} fresh processes per figure (ms)"
    )
    print(f"load average (1, 5, 15 min): before {fmt_load(args.load_before)}, after {fmt_load(load_now())}")
    print()
    print(table(samples, args.n, labels))
    print()
    print(table(samples, args.n, labels, cpu=True))
    print()
    if args.store == "sqlite":
        print(render_verdicts(verdicts(samples, args.n, args.loops)))
        return
    print(per_state_table(samples, args.n, labels))
    print()
    print(render_verdicts(server_verdicts(samples, args.n, args.loops, RAW_LABELS[args.store])))


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    started = time.perf_counter()
    args.load_before = load_now()
    notes: list[str] = []
    others = comparisons(args, notes)
    try:
        samples, described, profile = collect(args, others, notes)
    except ServerUnavailable as exc:
        print(f"cannot run on {args.store}: {exc}", file=sys.stderr)
        return 2
    failures = [s for s in samples if s.error is not None]
    if samples:
        report(args, argv, samples, described, others)
    for note in notes:
        print(f"note: {note}")
    for sample in failures:
        print(f"\nFAILED: {sample.job.label} N={sample.n:,} rep {sample.rep + 1}: {sample.error}")
    if profile is not None:
        print()
        print(profile)
    print(f"\n{len(samples)} children in {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        payload = {
            "machine": {**machine(), "store": described},
            "load_before": args.load_before,
            "load_after": load_now(),
            "samples": [{**asdict(s), "job": asdict(s.job), "label": s.job.label} for s in samples],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if failures else 0


def load_now() -> tuple[float, ...]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def fmt_load(load: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM unwinds as Ctrl-C does: the servers are stopped


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
