"""What a worker pays: the library against raw sqlite3, diskcache and LangGraph, each in a fresh process.

    python benchmarks/persist.py                   # N = 10,000 and 100,000, medians of 5
    python benchmarks/persist.py --smoke           # tiny N, one run of each, a few seconds (CI)
    python benchmarks/persist.py --n 10k --repeat 7 --json out.json
    python benchmarks/persist.py --profile-only --profile prof/   # cProfile one child of 10,000 states

Every measurement is a child process of its own (`_worker_child.py`), started
on a fresh copy of the data its system stored (as a worker starts after a
deploy), and the systems take turns within each repetition, in a rotating
order. Each child times its cold start (from after its imports to every
state's value in hand), then a persist with every state changed and one with
1% changed (from the emit, or the first write, to every write durable). The
heartbeat children run the library's cold start, then its first persist with a
task sleeping 1 ms in a loop beside it. Nothing touches the garbage collector.

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _worker_setup import fresh_copy, template  # noqa: E402

CHILD = HERE / "_worker_child.py"
SMOKE_N = 200
LANGGRAPH_MAX_N = 10_000
"""LangGraph commits every state on its own: 100,000 puts take minutes a run."""
COLD_TARGET = 1.5
PERSIST_TARGET = {10_000: 1.3, 100_000: 1.6}
ONE_PERCENT_TARGET = 1.5
HEARTBEAT_TARGET_MS = 20.0
HEARTBEAT_TARGET_N = 100_000
LINEAR_TARGET = 11.0


@dataclass(frozen=True)
class Job:
    """One kind of child: a system (and loop), measured at one N."""

    system: str
    loop: str | None = None
    heartbeat: bool = False

    @property
    def label(self) -> str:
        if self.system == "ours":
            return f"{'heartbeat' if self.heartbeat else 'ours'} {self.loop}"
        return {"raw": "raw sqlite3", "diskcache": "diskcache", "langgraph": "LangGraph"}[self.system]


@dataclass
class Sample:
    job: Job
    n: int
    rep: int
    load: float
    figures: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


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


def jobs_for(n: int, loops: Sequence[str], others: Sequence[str]) -> list[Job]:
    jobs = [Job("ours", loop) for loop in loops] + [Job("raw")]
    jobs += [Job(name) for name in others if name != "langgraph" or n <= LANGGRAPH_MAX_N]
    return jobs + [Job("ours", loop, heartbeat=True) for loop in loops]


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_child(job: Job, n: int, rep: int, root: Path, timeout: float) -> Sample:
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
        fresh_copy(template(root, job.system, n), work)
        sample.load = load_average()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE)
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sample.seconds = time.perf_counter() - started
    if sample.error is not None:
        progress(f"  {job.label} N={n} rep {rep + 1}: FAILED: {sample.error.splitlines()[0]}")
    else:
        figures = ", ".join(f"{k} {v * 1000:.1f}" for k, v in sample.figures.items())
        progress(f"  {job.label:<17} {figures} ms (load {sample.load:.2f}, {sample.seconds:.1f} s)")
    return sample


def measure(args: argparse.Namespace, root: Path, others: Sequence[str]) -> list[Sample]:
    """Every job at every N, `repeat` times, interleaved; in parallel only in a smoke run."""
    samples: list[Sample] = []
    for n in args.n:
        jobs = jobs_for(n, args.loops, others)
        progress(f"N={n:,}: templates for {', '.join(sorted({j.system for j in jobs}))}")
        for system in sorted({j.system for j in jobs}):
            template(root, system, n)
        timeout = args.timeout or max(120.0, n * 0.003)
        for rep in range(args.repeat):
            order = jobs[rep % len(jobs) :] + jobs[: rep % len(jobs)]
            progress(f"N={n:,} rep {rep + 1}/{args.repeat}: {', '.join(j.label for j in order)}")
            if args.smoke:  # timings are not looked at: the children may share the CPUs
                with ThreadPoolExecutor(3) as pool:
                    samples += pool.map(partial(run_child, n=n, rep=rep, root=root, timeout=timeout), order)
            else:
                samples += [run_child(job, n, rep, root, timeout) for job in order]
    return samples


# -- the report -------------------------------------------------------------------------

CASES = (
    ("cold", "cold start: every value in hand"),
    ("persist_all", "persist-all (every state changed)"),
    ("persist_1pct", "1% changed, then persist"),
    ("heartbeat", "heartbeat max wait (1 ms sleeper)"),
)


def median_of(samples: Sequence[Sample], label: str, n: int, figure: str) -> float | None:
    """The median, in ms, of one figure of one job at one N (None when none measured it)."""
    values = [
        s.figures[figure] * 1000
        for s in samples
        if s.job.label == label and s.n == n and s.error is None and figure in s.figures
    ]
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table(samples: Sequence[Sample], ns: Sequence[int], labels: Sequence[str], cpu: bool = False) -> str:
    """Medians in ms per case and system; `cpu`: the CPU time of the child's process instead of wall time."""
    headers = ["case" + (" (CPU ms)" if cpu else " (ms)"), "N", *labels, "load 1-min"]
    rows = []
    for n in ns:
        for figure, name in CASES[:3] if cpu else CASES:
            figure = figure + "_cpu" if cpu else figure
            source = [
                label.replace("ours", "heartbeat") if figure == "heartbeat" else label for label in labels
            ]
            cells = [fmt(median_of(samples, label, n, figure)) for label in source]
            if all(cell == "-" for cell in cells):
                continue
            loads = [s.load for s in samples if s.n == n and figure in s.figures]
            load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "-"
            rows.append([name, f"{n:,}", *cells, load])
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


@dataclass
class Verdict:
    target: str
    loop: str
    n: str
    ours: float | None
    reference: float | None
    limit: float
    ms: bool = False
    """An absolute limit in ms instead of a ratio."""
    cpu_ratio: float | None = None
    """The same ratio of CPU times (steadier than wall time on a busy machine), for information."""

    @property
    def value(self) -> float | None:
        if self.ms:
            return self.ours
        if self.ours is None or self.reference is None or self.reference <= 0:
            return None
        return self.ours / self.reference

    @property
    def result(self) -> str:
        value = self.value
        if value is None:
            return "not measured"
        return "met" if value <= self.limit else "missed"


def ratio(mine: float | None, theirs: float | None) -> float | None:
    return None if mine is None or theirs is None or theirs <= 0 else mine / theirs


def verdicts(samples: Sequence[Sample], ns: Sequence[int], loops: Sequence[str]) -> list[Verdict]:
    out: list[Verdict] = []
    for loop in loops:
        ours = f"ours {loop}"
        for n in ns:
            persist_limit = PERSIST_TARGET[10_000] if n <= 10_000 else PERSIST_TARGET[100_000]
            for figure, target, ref, limit in (
                ("cold", f"cold start <= {COLD_TARGET:g}x raw", "raw sqlite3", COLD_TARGET),
                ("cold", "cold start ahead of diskcache", "diskcache", 1.0),
                ("persist_all", f"persist-all <= {persist_limit:g}x raw", "raw sqlite3", persist_limit),
                (
                    "persist_1pct",
                    f"1% changed <= {ONE_PERCENT_TARGET:g}x raw",
                    "raw sqlite3",
                    ONE_PERCENT_TARGET,
                ),
                ("persist_1pct", "1% changed ahead of diskcache", "diskcache", 1.0),
            ):
                mine, theirs = median_of(samples, ours, n, figure), median_of(samples, ref, n, figure)
                cpu = ratio(
                    median_of(samples, ours, n, figure + "_cpu"), median_of(samples, ref, n, figure + "_cpu")
                )
                out.append(Verdict(target, loop, f"{n:,}", mine, theirs, limit, cpu_ratio=cpu))
        if HEARTBEAT_TARGET_N in ns:
            wait = median_of(samples, f"heartbeat {loop}", HEARTBEAT_TARGET_N, "heartbeat")
            target = f"heartbeat <= {HEARTBEAT_TARGET_MS:g} ms"
            out.append(
                Verdict(target, loop, f"{HEARTBEAT_TARGET_N:,}", wait, None, HEARTBEAT_TARGET_MS, ms=True)
            )
        small, large = min(ns), max(ns)
        if large == 10 * small:
            for figure, name in (
                ("cold", "cold start"),
                ("persist_all", "persist-all"),
                ("persist_1pct", "1%"),
            ):
                big, little = median_of(samples, ours, large, figure), median_of(samples, ours, small, figure)
                target = f"linear: {name}, 10x N costs <= {LINEAR_TARGET:g}x"
                cpu = ratio(
                    median_of(samples, ours, large, figure + "_cpu"),
                    median_of(samples, ours, small, figure + "_cpu"),
                )
                out.append(
                    Verdict(target, loop, f"{large:,}/{small:,}", big, little, LINEAR_TARGET, cpu_ratio=cpu)
                )
    return out


def render_verdicts(rows: Sequence[Verdict]) -> str:
    headers = ["target", "loop", "N", "ours ms", "ref ms", "measured", "result", "CPU ratio"]
    cells = []
    for v in rows:
        value = v.value
        measured = "-" if value is None else f"{value:.1f} ms" if v.ms else f"{value:.2f}x"
        cpu = "-" if v.cpu_ratio is None else f"{v.cpu_ratio:.2f}x"
        cells.append([v.target, v.loop, v.n, fmt(v.ours), fmt(v.reference), measured, v.result, cpu])
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]
    right = {2, 3, 4, 5, 7}
    lines = []
    for row in [headers, ["-" * w for w in widths], *cells]:
        lines.append(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(line.rstrip() for line in lines)


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


def profile_phases(directory: Path, root: Path, n: int, loop: str, top: int) -> str:
    """cProfile the library's cold start, persist-all and 1% persist of `n` states in a child (main
    thread only: the store's own thread shows as waits); the top functions of each, as text."""
    import io
    import pstats

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / f"ours-{loop}-{n}"
    work = fresh_copy(template(root, "ours", n), root / f"profile-{loop}-{n}")
    try:
        command = [sys.executable, str(CHILD), "ours", str(n), str(work), "--loop", loop]
        done = subprocess.run(
            [*command, "--profile", str(prefix)],
            capture_output=True,
            text=True,
            timeout=max(120.0, n * 0.003),
        )
        if done.returncode != 0:
            raise RuntimeError(f"the profiled child failed:\n{tail(done.stderr)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = io.StringIO()
    for name in ("cold", "persist_all", "persist_1pct"):
        path = prefix.with_name(f"{prefix.name}-{name}.prof")
        stats = pstats.Stats(str(path), stream=out).strip_dirs()
        out.write(f"cProfile of {name}, ours {loop}, N={n:,} ({path}), by own time:\n")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    started = time.perf_counter()
    info = machine()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    without = {name.strip() for name in args.without.split(",")}
    others = [name for name in ("diskcache", "langgraph") if name not in without]
    notes = []
    for name, module, package in (
        ("diskcache", "diskcache", "diskcache"),
        ("langgraph", "langgraph.checkpoint.sqlite", "langgraph-checkpoint-sqlite"),
    ):
        if name in others and not available(module):
            others.remove(name)
            notes.append(f"{name}: not installed (`.venv/bin/pip install {package}` adds its column)")
    if "langgraph" in others and max(args.n) > LANGGRAPH_MAX_N:
        notes.append(f"LangGraph measured up to N={LANGGRAPH_MAX_N:,} (one commit per state)")
    if args.tmp_dir is not None:
        args.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rs-worker-bench-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        if on_tmpfs(root):
            notes.append(f"{root} is on tmpfs: fsync costs nothing there; give --tmp-dir on a real disk")
        samples = [] if args.profile_only else measure(args, root, others)
        profile = None
        if args.profile is not None:
            progress(f"profiling a cold start and two persists of {args.profile_n:,} states")
            profile = profile_phases(args.profile, root, args.profile_n, args.loops[0], 25)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    failures = [s for s in samples if s.error is not None]
    if samples:
        labels = [f"ours {loop}" for loop in args.loops] + ["raw sqlite3"]
        labels += [{"diskcache": "diskcache", "langgraph": "LangGraph"}[name] for name in others]
        print(
            f"recoverable-state worker benchmark at {info['revision']}, {info['date']} -- Python "
            f"{info['python']}, {info['cpus']} CPUs, SQLite {info['sqlite']} (WAL, synchronous=FULL), "
            f"{info['platform']}"
        )
        print(
            f"command: {' '.join(['python', 'benchmarks/persist.py', *(argv or sys.argv[1:])])}; "
            f"medians of {args.repeat} fresh processes per figure (ms)"
        )
        print(f"load average (1, 5, 15 min): before {fmt_load(load_before)}, after {fmt_load(load_after)}")
        print()
        print(table(samples, args.n, labels))
        print()
        print(table(samples, args.n, labels, cpu=True))
        print()
        print(render_verdicts(verdicts(samples, args.n, args.loops)))
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
            "machine": info,
            "load_before": load_before,
            "load_after": load_after,
            "samples": [{**asdict(s), "job": asdict(s.job), "label": s.job.label} for s in samples],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if failures else 0


def fmt_load(load: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
