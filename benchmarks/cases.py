"""The in-process case suite: every store and case, library and raw baseline side by side in one process.

    python benchmarks/cases.py                      # sqlite and file, N = 1k, 10k, 100k
    python benchmarks/cases.py --smoke              # every case once at tiny sizes
    python benchmarks/cases.py --stores memory,redis --redis-url redis://127.0.0.1:6379/0
    python benchmarks/cases.py --start-servers      # adds throwaway Redis and PostgreSQL
    python benchmarks/cases.py --json results.json

For finding regressions between commits, per store and case (file, memory,
Redis, PostgreSQL; emit overhead, memory per state, 50 KB states, SIGTERM).
Its ratios are not what a worker pays: the library and its baseline share one
process (the baseline runs beside a heap full of states, so the collector slows
it), and "initialize-all" times `initialize_many` alone. The worker's figures,
and the README's table, come from `benchmarks/persist.py`, which runs every
system in a fresh process of its own.

Every figure is the median of `--repeat` runs (fewer for N >= 50,000), printed
beside its raw baseline: the same models serialised to JSON bytes and written
with the store's driver directly, in the best batch that driver offers. The
"target" column says what the design aims for; "MISSED" marks a figure that is
off target. Nothing here asserts a time: the exit code only says whether the
script ran."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # run as `python benchmarks/persist.py` or imported
    sys.path.insert(0, str(HERE))

import anyio  # noqa: E402
from _bench_cases import (  # noqa: E402
    idle_heartbeat,
    library_emit,
    library_heartbeat,
    library_initialize,
    library_persist,
    memory_per_state,
    raw_initialize,
    raw_persist,
    raw_spawn,
)
from _bench_crawlee import INSTALL_HINT, crawlee_available, crawlee_initialize, crawlee_persist  # noqa: E402
from _bench_others import (  # noqa: E402
    DISKCACHE_HINT,
    LANGGRAPH_HINT,
    diskcache_available,
    diskcache_initialize,
    diskcache_persist,
    langgraph_available,
    langgraph_initialize,
    langgraph_persist,
)
from _bench_stores import Store, make_store  # noqa: E402

from recoverable_state import service_locator  # noqa: E402

CASES = ("persist", "persist-50kb", "initialize", "heartbeat", "emit", "sigterm", "memory")
LOOPS = ("asyncio", "trio")
STORES = ("sqlite", "file", "memory", "redis", "postgres")

PERSIST_TARGET = {"sqlite": 1.5, "file": 1.5, "redis": 3.0, "postgres": 3.0}
"""Library persist-all time / raw time, per store (memory has no target: a dict is not a store)."""
PERSIST_TARGET_LARGE = {"sqlite": 2.0}
"""The same at N >= LARGE_N, where it differs."""
ONE_PERCENT_RAW_TARGET = {"sqlite": 2.0}
"""Library persist with 1% changed / raw writing only that 1%, per store."""
HEARTBEAT_TARGET_MS = 20.0
"""The longest a 1 ms heartbeat task may wait while the largest N persists at once."""
MEMORY_TARGET_B = 1024.0
"""Bytes per state beyond its model."""
OTHERS_MAX_N = {"diskcache": 100_000, "langgraph": 10_000}
"""The largest N each comparison column is measured at (LangGraph commits every state on its own)."""
INITIALIZE_TARGET = 2.0
ONE_PERCENT_TARGET = 0.10
"""Persisting with 1% changed, as a fraction of persisting with all changed."""
LINEARITY_TARGET = 11.0
"""Time at N = 100,000 / time at N = 10,000."""
SIGTERM_TARGET_S = 1.0
SIGTERM_NS = (1_000, 10_000)
SIGTERM_SCRIPT = HERE / "sigterm.py"
"""Written separately; run as a subprocess when it exists."""
CRAWLEE_MAX_N = 10_000
LARGE_N = 50_000
SMOKE_N = 20
SMOKE_N_BIG = 5
"""States of 50 KB in a smoke run."""

CASE_NAMES = {
    "persist": "persist-all",
    "persist-50kb": "persist-all 50KB",
    "initialize": "initialize-all",
    "emit": "emit overhead",
    "heartbeat": "heartbeat max wait",
    "memory": "memory per state",
    "sigterm": "SIGTERM to exit",
}
ROW_ORDER = (
    "persist-all",
    "persist-all 50KB",
    "persist-1% vs all",
    "persist-1% vs raw-1%",
    "initialize-all",
    "initialize-all vs diskcache",
    "heartbeat max wait",
    "emit overhead",
    "memory per state",
    "memory per state, watched",
    "SIGTERM to exit",
)


def case_rank(case: str) -> int:
    """Where rows of `case` go in the table (linearity rows last)."""
    return ROW_ORDER.index(case) if case in ROW_ORDER else len(ROW_ORDER)


log = logging.getLogger("bench")


@dataclass
class Row:
    """One line of the table."""

    case: str
    store: str
    loop: str
    n: int | str
    library: float | None = None
    raw: float | None = None
    target: str = "-"
    limit: float | None = None
    """The ratio the target allows (None: no target, the row is for information)."""
    limit_ms: float | None = None
    """An absolute target instead: the library time must stay under this."""
    unit: str = "ms"
    percent: bool = False
    """Show the ratio as a percentage."""
    library_samples: list[float] = field(default_factory=list)
    raw_samples: list[float] = field(default_factory=list)
    crawlee: float | None = None
    diskcache: float | None = None
    langgraph: float | None = None
    error: str | None = None
    note: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.library is None or self.raw is None or self.raw <= 0:
            return None
        return self.library / self.raw

    @property
    def result(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.library is None:
            return "skipped"
        if self.limit_ms is not None:
            return "met" if self.library <= self.limit_ms else "MISSED"
        ratio = self.ratio
        if self.limit is None or ratio is None:
            return ""
        return "met" if ratio <= self.limit else "MISSED"


# -- running the cases ------------------------------------------------------------


@dataclass
class Plan:
    ns: list[int]
    repeat: int
    repeat_large: int
    stores: list[Store]
    loops: list[str]
    cases: list[str]
    root: Path
    profile_dir: Path | None
    skipped: list[str] = field(default_factory=list)
    smoke: bool = False
    """A smoke run: every case once at tiny sizes, SIGTERM to exit included."""

    @property
    def sigterm_ns(self) -> tuple[int, ...]:
        return (min(self.ns),) if self.smoke else SIGTERM_NS

    def repeats(self, n: int) -> int:
        return self.repeat if n < LARGE_N else min(self.repeat, self.repeat_large)

    def profile_path(self, *parts: object) -> Path | None:
        if self.profile_dir is None:
            return None
        return self.profile_dir / ("-".join(str(p) for p in parts) + ".prof")


def ms(seconds: Sequence[float]) -> list[float]:
    return [s * 1000 for s in seconds]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def guarded(rows: list[Row], ident: tuple[str, str, str, int | str], run: Callable[[], list[Row]]) -> None:
    """Run one case; a failure becomes an error row and the benchmark goes on."""
    case, store, loop, n = ident
    progress(f"{CASE_NAMES.get(case, case):<17} {store:<8} {loop:<7} N={n}")
    started = time.perf_counter()
    try:
        rows.extend(run())
    except Exception as exc:
        log.debug("case failed", exc_info=True)
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        rows.append(Row(CASE_NAMES.get(case, case), store, loop, n, error=detail))
        progress(f"  failed: {detail}")
    finally:
        service_locator.reset()
    progress(f"  done in {time.perf_counter() - started:.1f} s")


def persist_rows(plan: Plan, store: Store, loop: str, n: int, big: bool) -> list[Row]:
    reps = plan.repeats(n)
    fractions = (1.0,) if big else (1.0, 0.01)
    with_crawlee = (
        not big
        and not plan.smoke  # a comparison column, not a case: left out of the smoke run
        and store.name == "file"
        and loop == "asyncio"
        and n <= CRAWLEE_MAX_N
        and crawlee_available()
    )
    label = "persist-50kb" if big else "persist"
    others = (
        []
        if big or store.name != "sqlite"
        else [
            (name, fn)
            for name, available, fn in (
                ("diskcache", diskcache_available, diskcache_persist),
                ("langgraph", langgraph_available, langgraph_persist),
            )
            if n <= OTHERS_MAX_N[name] and available()
        ]
    )

    async def main() -> dict[str, list[float]]:
        series: dict[str, list[float]] = {
            "lib_all": [],
            "lib_1": [],
            "raw_all": [],
            "raw_1": [],
            "crawlee": [],
            "diskcache_all": [],
            "diskcache_1": [],
            "langgraph_all": [],
            "langgraph_1": [],
        }
        profile = [plan.profile_path(label, store.name, loop, n, part) for part in ("all", "1pct")]
        parts = [
            ("lib", partial(library_persist, store, n, big=big, fractions=fractions, profile=profile)),
            ("raw", partial(raw_persist, store, n, big=big, fractions=fractions)),
        ]
        for rep in range(reps):
            for name, part in parts if rep % 2 == 0 else reversed(parts):
                times = await part()
                series[f"{name}_all"].append(times[0])
                if len(times) > 1:
                    series[f"{name}_1"].append(times[1])
            if with_crawlee:
                series["crawlee"].append(await crawlee_persist(plan.root / f"crawlee-{rep}", n))
            for name, fn in others:
                times = fn(plan.root, n, fractions)
                series[f"{name}_all"].append(times[0])
                series[f"{name}_1"].append(times[1])
        return series

    s = {k: ms(v) for k, v in anyio.run(main, backend=loop).items()}
    limit = (PERSIST_TARGET_LARGE if n >= LARGE_N else PERSIST_TARGET).get(store.name)
    limit = limit if limit is not None else PERSIST_TARGET.get(store.name)
    rows = [
        Row(
            "persist-all 50KB" if big else "persist-all",
            store.name,
            loop,
            n,
            median(s["lib_all"]),
            median(s["raw_all"]),
            target=f"<={limit:g}x" if limit else "-",
            limit=limit,
            library_samples=s["lib_all"],
            raw_samples=s["raw_all"],
            crawlee=median(s["crawlee"]),
            diskcache=median(s["diskcache_all"]),
            langgraph=median(s["langgraph_all"]),
        )
    ]
    if not big:
        rows.append(
            Row(
                "persist-1% vs all",
                store.name,
                loop,
                n,
                median(s["lib_1"]),
                median(s["lib_all"]),
                target=f"<={ONE_PERCENT_TARGET:.0%} of all",
                limit=ONE_PERCENT_TARGET,
                percent=True,
                library_samples=s["lib_1"],
                raw_samples=s["lib_all"],
            )
        )
        raw_limit = ONE_PERCENT_RAW_TARGET.get(store.name)
        rows.append(
            Row(
                "persist-1% vs raw-1%",
                store.name,
                loop,
                n,
                median(s["lib_1"]),
                median(s["raw_1"]),
                target=f"<={raw_limit:g}x" if raw_limit else "-",
                limit=raw_limit,
                library_samples=s["lib_1"],
                raw_samples=s["raw_1"],
                diskcache=median(s["diskcache_1"]),
                langgraph=median(s["langgraph_1"]),
            )
        )
    return rows


def initialize_rows(plan: Plan, store: Store, loop: str, n: int) -> list[Row]:
    reps = plan.repeats(n)
    with_crawlee = (
        not plan.smoke
        and store.name == "file"
        and loop == "asyncio"
        and n <= CRAWLEE_MAX_N
        and crawlee_available()
    )
    others = (
        []
        if store.name != "sqlite"
        else [
            (name, fn)
            for name, available, fn in (
                ("diskcache", diskcache_available, diskcache_initialize),
                ("langgraph", langgraph_available, langgraph_initialize),
            )
            if n <= OTHERS_MAX_N[name] and available()
        ]
    )

    async def main() -> dict[str, list[float]]:
        names = ("lib", "raw", "crawlee", "diskcache", "langgraph")
        series: dict[str, list[float]] = {name: [] for name in names}
        profile = plan.profile_path("initialize", store.name, loop, n)
        for rep in range(reps):
            parts = [
                ("lib", partial(library_initialize, store, n, big=False, profile=profile)),
                ("raw", partial(raw_initialize, store, n, big=False)),
            ]
            for name, part in parts if rep % 2 == 0 else reversed(parts):
                series[name].append(await part())
            if with_crawlee:
                series["crawlee"].append(await crawlee_initialize(plan.root / f"crawlee-{rep}", n))
            for name, fn in others:
                series[name].append(fn(plan.root, n))
        return series

    s = {k: ms(v) for k, v in anyio.run(main, backend=loop).items()}
    extra = []
    if s["diskcache"]:
        extra.append(
            Row(
                "initialize-all vs diskcache",
                store.name,
                loop,
                n,
                median(s["lib"]),
                median(s["diskcache"]),
                target="<1x (faster)",
                limit=0.9999,
                library_samples=s["lib"],
                raw_samples=s["diskcache"],
            )
        )
    return [
        *extra,
        Row(
            "initialize-all",
            store.name,
            loop,
            n,
            median(s["lib"]),
            median(s["raw"]),
            target=f"<={INITIALIZE_TARGET:g}x",
            limit=INITIALIZE_TARGET,
            library_samples=s["lib"],
            raw_samples=s["raw"],
            crawlee=median(s["crawlee"]),
            diskcache=median(s["diskcache"]),
            langgraph=median(s["langgraph"]),
        ),
    ]


def heartbeat_rows(plan: Plan, store: Store, loop: str, n: int) -> list[Row]:
    """The longest a 1 ms heartbeat waits while `n` changed states persist at once."""

    async def main() -> tuple[float, float, float]:
        longest, seconds = await library_heartbeat(store, n)
        return longest, seconds, await idle_heartbeat(seconds)

    longest, seconds, idle = anyio.run(main, backend=loop)
    return [
        Row(
            "heartbeat max wait",
            store.name,
            loop,
            n,
            longest * 1000,
            idle * 1000,
            target=f"<={HEARTBEAT_TARGET_MS:g} ms",
            limit_ms=HEARTBEAT_TARGET_MS,
            note=f"during a persist of {seconds * 1000:,.0f} ms; raw = the same heartbeat on an idle loop",
        )
    ]


def emit_rows(plan: Plan, loop: str, n: int) -> list[Row]:
    reps = plan.repeats(n)

    async def main() -> dict[str, list[float]]:
        series: dict[str, list[float]] = {"lib": [], "raw": []}
        for _ in range(reps):
            series["lib"].append(await library_emit(n, profile=plan.profile_path("emit", loop, n)))
            series["raw"].append(await raw_spawn(n))
        return series

    s = {k: ms(v) for k, v in anyio.run(main, backend=loop).items()}
    return [
        Row(
            "emit overhead",
            "-",
            loop,
            n,
            median(s["lib"]),
            median(s["raw"]),
            library_samples=s["lib"],
            raw_samples=s["raw"],
        )
    ]


def memory_rows(plan: Plan, store: Store, loop: str, n: int) -> list[Row]:
    per_state, per_model, handed = anyio.run(partial(memory_per_state, store, n), backend=loop)
    return [
        Row(
            "memory per state",
            store.name,
            loop,
            n,
            per_state,
            per_model,
            target=f"<={MEMORY_TARGET_B:,.0f} B",
            limit_ms=MEMORY_TARGET_B,
            unit="B",
        ),
        Row("memory per state, watched", store.name, loop, n, handed, per_model, unit="B"),
    ]


# -- SIGTERM (benchmarks/sigterm.py, written separately) ----------------------------

_TIME_WORDS = ("exit", "sigterm", "elapsed", "duration", "time", "seconds", "latency", "median")


def _numbers(obj: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, float(obj)


def _to_ms(name: str, value: float) -> float:
    """`value` in ms: its path says ms (`exit_ms`, `ms.median`) or it is taken as seconds."""
    parts = [p for p in name.lower().replace("[", ".").replace("]", "").split(".") if p]
    if any(p == "ms" or p.endswith("_ms") or "millis" in p for p in parts):
        return value
    return value * 1000


def _scopes_for(data: Any, n: int) -> list[Any]:
    """The parts of sigterm.py's JSON about `n` states: the objects with n == N, or all of it."""
    found: list[Any] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            if any(str(k).lower() in ("n", "states", "n_states", "count") and v == n for k, v in obj.items()):
                found.append(obj)
                return
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(data)
    if found:
        return found
    if isinstance(data, dict) and str(n) in data:
        return [data[str(n)]]
    return [data]


def _loop_of(scope: Any) -> str:
    if isinstance(scope, dict):
        for key in ("loop", "backend", "event_loop"):
            if isinstance(scope.get(key), str):
                return str(scope[key])
    return "-"


def sigterm_figures(data: Any, n: int) -> list[tuple[str, float | None, float | None, list[str]]]:
    """(loop, library ms, baseline ms, numeric fields seen) per loop, from sigterm.py's JSON."""
    out = []
    for scope in _scopes_for(data, n):
        found = list(_numbers(scope))
        timed = [(k, v) for k, v in found if any(w in k.lower() for w in _TIME_WORDS)]
        baseline = [
            (k, v) for k, v in timed if any(w in k.lower() for w in ("raw", "baseline", "bare", "empty"))
        ]
        library = [(k, v) for k, v in timed if (k, v) not in baseline]
        library.sort(key=lambda kv: ("median" not in kv[0].lower(), "exit" not in kv[0].lower()))
        baseline.sort(key=lambda kv: "median" not in kv[0].lower())
        lib_ms = _to_ms(*library[0]) if library else None
        raw_ms = _to_ms(*baseline[0]) if baseline else None
        out.append((_loop_of(scope), lib_ms, raw_ms, [k for k, _ in found]))
    return out


def sigterm_rows(plan: Plan) -> list[Row]:
    script = SIGTERM_SCRIPT
    if not script.exists():
        return [
            Row("SIGTERM to exit", "-", "-", n, note="benchmarks/sigterm.py does not exist yet; skipped")
            for n in plan.sigterm_ns
        ]
    helptext = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    if "--json" not in helptext:
        return [
            Row(
                "SIGTERM to exit",
                "-",
                "-",
                n,
                note="benchmarks/sigterm.py has no --json option; skipped (run that script on its own)",
            )
            for n in plan.sigterm_ns
        ]
    outputs: dict[tuple[str, ...], Any] = {}

    def run(args: list[str]) -> Any:
        """sigterm.py's JSON for these arguments (run once even when asked for each N)."""
        key = tuple(args)
        if key not in outputs:
            with tempfile.TemporaryDirectory(dir=plan.root) as tmp:
                out = Path(tmp) / "sigterm.json"
                progress(f"SIGTERM to exit: python {script.name} {' '.join(args)}")
                done = subprocess.run(
                    [sys.executable, str(script), *args, "--json", str(out)],
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                if done.returncode != 0 or not out.exists():
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"sigterm.py exited with {done.returncode}: {tail[0]}")
                outputs[key] = json.loads(out.read_text())
        return outputs[key]

    rows = []
    for n in plan.sigterm_ns:
        target = (f"<{SIGTERM_TARGET_S:g} s", SIGTERM_TARGET_S * 1000) if n >= 10_000 else ("-", None)
        args = (
            ["--n", str(n)] if "--n" in helptext else ["--states", str(n)] if "--states" in helptext else []
        )
        if "--repeat" in helptext:
            args += ["--repeat", str(plan.repeats(n))]
        try:
            figures = sigterm_figures(run(args), n)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
            rows.append(Row("SIGTERM to exit", "-", "-", n, error=f"{type(exc).__name__}: {exc}"))
            continue
        for loop, lib_ms, raw_ms, seen in figures:
            row = Row("SIGTERM to exit", "-", loop, n, lib_ms, raw_ms, target=target[0], limit_ms=target[1])
            if lib_ms is None:
                row.note = f"no time found in sigterm.py's JSON (fields: {', '.join(seen[:12]) or 'none'})"
            rows.append(row)
    return rows


# -- linearity ----------------------------------------------------------------------


def linearity_rows(rows: Sequence[Row]) -> list[Row]:
    """Library time at N = 100,000 against N = 10,000, for each case, store and loop."""
    by_key: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in rows:
        if (
            row.unit == "ms"
            and row.library is not None
            and isinstance(row.n, int)
            and row.case != "SIGTERM to exit"
        ):
            if row.case in ("persist-1% vs raw-1%", "initialize-all vs diskcache"):
                continue  # the same library figure as another row
            by_key.setdefault((row.case, row.store, row.loop), {})[row.n] = row.library
    out = []
    for (case, store, loop), figures in by_key.items():
        if 10_000 in figures and 100_000 in figures:
            out.append(
                Row(
                    f"linearity {case.replace(' vs all', '')}",
                    store,
                    loop,
                    "100k/10k",
                    figures[100_000],
                    figures[10_000],
                    target=f"<={LINEARITY_TARGET:g}x",
                    limit=LINEARITY_TARGET,
                )
            )
    return out


# -- output -------------------------------------------------------------------------


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value:,.0f} B"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_ratio(row: Row) -> str:
    ratio = row.ratio
    if ratio is None:
        return "-"
    if row.percent:
        return f"{ratio:.1%}"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def render(rows: Sequence[Row], with_crawlee: bool) -> tuple[str, list[str]]:
    """The table as aligned plain text, and the numbered notes under it."""
    headers = ["case", "store", "loop", "N", "library (ms)", "raw (ms)", "ratio", "target", "result"]
    columns = [name for name in ("diskcache", "langgraph") if any(getattr(r, name) is not None for r in rows)]
    if with_crawlee:
        headers.append("crawlee (ms)")
    headers += [f"{name} (ms)" for name in columns]
    notes: list[str] = []
    lines = []
    for row in rows:
        result = row.result
        if row.error is not None:
            notes.append(f"{row.case} / {row.store} / {row.loop} / N={row.n}: {row.error}")
            result = f"ERROR [{len(notes)}]"
        elif row.note is not None:
            notes.append(f"{row.case} / N={row.n}: {row.note}")
            result = (result or "note") + f" [{len(notes)}]"
        n = f"{row.n:,}" if isinstance(row.n, int) else row.n
        cells = [
            row.case,
            row.store,
            row.loop,
            n,
            fmt_value(row.library, row.unit),
            fmt_value(row.raw, row.unit),
            fmt_ratio(row),
            row.target,
            result,
        ]
        if with_crawlee:
            cells.append(fmt_value(row.crawlee, "ms"))
        cells += [fmt_value(getattr(row, name), "ms") for name in columns]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(headers)]
    right = {3, 4, 5, 6, *range(9, len(headers))}

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded)

    out = [line(headers).rstrip(), line(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(rows, lines, strict=True):
        if previous is not None and row.case.split()[0] != previous:
            out.append("")
        previous = row.case.split()[0]
        out.append(line(cells).rstrip())
    return "\n".join(out), notes


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("recoverable-state", "anyio", "trio", "pydantic", "pyee", "redis", "psycopg"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    try:
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    return {
        "revision": revision or "unknown",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "versions": versions,
    }


def filesystem_of(path: Path) -> str | None:
    """The file-system type `path` lives on (Linux only), to warn about tmpfs."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    resolved = str(path.resolve())
    for entry in mounts:
        parts = entry.split()
        if len(parts) < 3 or len(parts[1]) < len(best):
            continue
        if resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/"):
            best, kind = parts[1], parts[2]
    return kind


# -- the command line ------------------------------------------------------------------


def parse_ns(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if part:
            out.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("give positive counts, such as 1000,10000")
    return out


def parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in items if p not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time persisting and loading RecoverableStates against a raw baseline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=parse_ns, default=None, help="state counts (default 1000,10000,100000)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure, median taken (default 5)")
    parser.add_argument(
        "--repeat-large",
        type=int,
        default=1,
        help=f"runs per figure for N >= {LARGE_N:,} (default 1: one such file-store case takes minutes)",
    )
    parser.add_argument("--stores", type=parse_list(STORES), default=None, help="default sqlite,file")
    parser.add_argument("--backends", "--loops", dest="loops", type=parse_list(LOOPS), default=list(LOOPS))
    parser.add_argument("--cases", type=parse_list(CASES), default=None, help=f"default {','.join(CASES)}")
    parser.add_argument("--redis-url", help="a Redis to benchmark on (only keys of its own are touched)")
    parser.add_argument("--postgres-url", help="a PostgreSQL database to benchmark on")
    parser.add_argument(
        "--start-servers", action="store_true", help="start throwaway Redis and PostgreSQL (tests/servers.py)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help=f"N={SMOKE_N}, one run, cheap cases: a few seconds"
    )
    parser.add_argument("--json", type=Path, help="also write the table (with every sample) as JSON here")
    parser.add_argument("--tmp-dir", type=Path, help="where stores live (default: the system temp dir)")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="cProfile each timed library section (event-loop thread only) into DIR/*.prof",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log tracebacks of failing cases")
    args = parser.parse_args(argv)
    if (args.repeat is not None and args.repeat < 1) or args.repeat_large < 1:
        parser.error("--repeat and --repeat-large must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("bench").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    ns = args.n or ([SMOKE_N] if args.smoke else [1_000, 10_000, 100_000])
    repeat = args.repeat or (1 if args.smoke else 5)
    cases = args.cases or list(CASES)
    started = time.perf_counter()
    info = machine()  # before the run: others may commit while it runs
    notes: list[str] = []
    if not crawlee_available():
        notes.append(INSTALL_HINT)
    if not diskcache_available():
        notes.append(DISKCACHE_HINT)
    if not langgraph_available():
        notes.append(LANGGRAPH_HINT)

    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        if args.redis_url:
            urls["redis"] = args.redis_url
        if args.postgres_url:
            urls["postgres"] = args.postgres_url
        if args.start_servers and not ("redis" in urls and "postgres" in urls):
            try:
                sys.path.insert(0, str(ROOT / "tests"))
                from servers import running_servers

                progress("starting Redis and PostgreSQL (tests/servers.py)")
                redis_url, postgres_url = stack.enter_context(running_servers())
                urls.setdefault("redis", redis_url)
                urls.setdefault("postgres", postgres_url)
            except Exception as exc:
                notes.append(f"--start-servers: could not start the servers ({type(exc).__name__}: {exc})")

        if args.stores is not None:
            store_names = args.stores
        else:
            store_names = ["sqlite", "file"] + (["memory"] if args.smoke else [])
            store_names += [s for s in ("redis", "postgres") if s in urls]
        tmp_base = args.tmp_dir
        if tmp_base is not None:
            tmp_base.mkdir(parents=True, exist_ok=True)
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rs-bench-", dir=tmp_base)))
        if filesystem_of(root) == "tmpfs":
            notes.append(f"{root} is on tmpfs: fsync costs nothing there; use --tmp-dir on a real disk")
        stores: list[Store] = []
        for name in store_names:
            if name in ("redis", "postgres") and name not in urls:
                notes.append(f"store {name} skipped: give --{name}-url or --start-servers")
                continue
            stores.append(make_store(name, root, urls))
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        plan = Plan(
            ns, repeat, args.repeat_large, stores, args.loops, cases, root, args.profile, smoke=args.smoke
        )
        rows = run_plan(plan)

    rows += linearity_rows(rows)
    table, row_notes = render(rows, with_crawlee=any(r.crawlee is not None for r in rows))
    print(
        f"recoverable-state persist benchmark at {info['revision']} -- Python {info['python']}, "
        f"{info['cpus']} CPUs, "
        f"SQLite {info['sqlite']}, {info['platform']}"
    )
    print(
        f"median of {repeat} runs ({plan.repeats(LARGE_N)} for N >= {LARGE_N:,}); "
        "ratio = library / raw, both measured in this run on the same data"
    )
    if args.profile is not None:
        print(f"NOTE: --profile was on; cProfile slows the library figures (profiles in {args.profile})")
    print()
    print(table)
    print()
    legend = [
        "persist-1% vs all: library with 1 state in 100 changed / library with all changed.",
        "persist-1% vs raw-1%: the same library figure / the raw baseline writing only that 1%.",
        "initialize-all vs diskcache: the library's cold load / diskcache's, on SQLite, same run.",
        "heartbeat max wait: the longest a task sleeping 1 ms waited while every state persisted at once.",
        "diskcache / langgraph columns: the same case through diskcache (one transaction) and LangGraph's",
        "  SqliteSaver (one put per state), told which states changed; shown when installed.",
        "linearity rows: library (ms) is the N=100,000 time, raw (ms) the N=10,000 one.",
        "emit overhead: one PERSIST_STATE to N no-op listeners / N no-op tasks in an anyio task group.",
        "memory per state: library = bytes per initialized state beyond its model, raw = the model alone;",
        "  watched: the same once every value was handed out (its lists, dicts and models watched).",
        "SIGTERM to exit: figures from benchmarks/sigterm.py; its target is absolute",
        "  (the raw column, if any, is that script's own baseline).",
    ]
    for line in legend:
        print(f"  {line}")
    all_notes = row_notes + notes
    if all_notes:
        print()
        for i, note in enumerate(all_notes, 1):
            print(f"[{i}] {note}")
    elapsed = time.perf_counter() - started
    print(f"\n{len(rows)} rows in {elapsed:.1f} s")

    if args.json is not None:
        payload = {
            "machine": info,
            "arguments": {
                "n": ns,
                "repeat": repeat,
                "repeat_large": plan.repeats(LARGE_N),
                "stores": [s.name for s in plan.stores],
                "loops": args.loops,
                "cases": cases,
                "smoke": args.smoke,
            },
            "seconds": elapsed,
            "rows": [{**asdict(r), "ratio": r.ratio, "result": r.result} for r in rows],
            "notes": all_notes,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


def run_plan(plan: Plan) -> list[Row]:
    rows: list[Row] = []
    sigterm_rows_in_background: list[Row] = []
    background: threading.Thread | None = None
    for case in plan.cases:
        if case == "sigterm":
            ident = ("sigterm", "-", "-", ",".join(f"{n:,}" for n in plan.sigterm_ns))
            if plan.smoke:
                # sigterm.py's own processes take most of a smoke run: let them run beside the
                # other cases (a smoke run checks that every case runs, not its figures).
                def run_sigterm(ident: tuple[str, str, str, str] = ident) -> None:
                    guarded(sigterm_rows_in_background, ident, lambda: sigterm_rows(plan))

                background = threading.Thread(target=run_sigterm, name="sigterm case")
                background.start()
            else:
                guarded(rows, ident, lambda: sigterm_rows(plan))
            continue
        if case == "emit":
            for loop in plan.loops:
                for n in plan.ns:
                    guarded(rows, ("emit", "-", loop, n), partial(emit_rows, plan, loop, n))
            continue
        if case == "heartbeat":
            n = max(plan.ns)
            stores = [s for s in plan.stores if s.name == "sqlite"] or plan.stores[:1]
            for store in stores:
                for loop in plan.loops:
                    ident = ("heartbeat", store.name, loop, n)
                    guarded(rows, ident, partial(heartbeat_rows, plan, store, loop, n))
            continue
        if case == "memory":
            n = min(max(plan.ns), 10_000)
            stores = [s for s in plan.stores if s.name == "sqlite"] or plan.stores[:1]
            for store in stores:
                for loop in plan.loops:
                    guarded(rows, ("memory", store.name, loop, n), partial(memory_rows, plan, store, loop, n))
            continue
        for store in plan.stores:
            for loop in plan.loops:
                if case == "persist":
                    for n in plan.ns:
                        guarded(
                            rows,
                            (case, store.name, loop, n),
                            partial(persist_rows, plan, store, loop, n, False),
                        )
                elif case == "persist-50kb":
                    n_big = SMOKE_N_BIG if plan.smoke else 1_000 if 1_000 in plan.ns else min(plan.ns)
                    if n_big <= 1_000:
                        guarded(
                            rows,
                            (case, store.name, loop, n_big),
                            partial(persist_rows, plan, store, loop, n_big, True),
                        )
                elif case == "initialize":
                    for n in plan.ns:
                        guarded(
                            rows, (case, store.name, loop, n), partial(initialize_rows, plan, store, loop, n)
                        )
    if background is not None:
        background.join()
        rows += sigterm_rows_in_background
    rows.sort(key=lambda r: (case_rank(r.case), r.store, r.loop, r.n if isinstance(r.n, int) else 0))
    return rows


if __name__ == "__main__":
    sys.exit(main())
