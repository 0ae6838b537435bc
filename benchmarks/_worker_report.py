"""The worker benchmark's samples and report: medians, tables and the verdicts against the targets.

`persist.py` measures; this turns its samples into the printed tables. The
targets come from the design (issue 22).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from _worker_model import changed_indexes

COLD_TARGET = 1.5
PERSIST_TARGET = {10_000: 1.3, 100_000: 1.6}
ONE_PERCENT_TARGET = 1.5
HEARTBEAT_TARGET_MS = 20.0
HEARTBEAT_TARGET_N = 100_000
LINEAR_TARGET = 11.0
SERVER_TARGET = 1.5
"""PostgreSQL and Redis: persist-all and cold start at most 1.5x the raw client's."""
RAW_LABELS = {"sqlite": "raw sqlite3", "postgres": "raw psycopg", "redis": "raw redis-py"}


@dataclass(frozen=True)
class Job:
    """One kind of child: a system (and loop), measured at one N."""

    system: str
    loop: str | None = None
    heartbeat: bool = False
    store: str = "sqlite"

    @property
    def label(self) -> str:
        if self.system == "ours":
            return f"{'heartbeat' if self.heartbeat else 'ours'} {self.loop}"
        if self.system == "raw":
            return RAW_LABELS[self.store]
        return {"diskcache": "diskcache", "langgraph": "LangGraph"}[self.system]


@dataclass
class Sample:
    job: Job
    n: int
    rep: int
    load: float
    figures: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


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
    return columns(headers, rows)


def columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A text table: the first column left-aligned, the others right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in [headers, ["-" * w for w in widths], *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def per_state_table(samples: Sequence[Sample], ns: Sequence[int], labels: Sequence[str]) -> str:
    """The worker's CPU time (the child's process_time) per state in each phase, in microseconds."""
    headers = ["CPU per state in the worker (us)", "N", *labels]
    rows = []
    for n in ns:
        for figure, name, states in (
            ("cold", "cold start, per state", n),
            ("persist_all", "persist-all, per state", n),
            ("persist_1pct", "1% changed, per changed state", len(changed_indexes(n, 0.01))),
        ):
            cpu = [median_of(samples, label, n, figure + "_cpu") for label in labels]
            cells = [fmt(None if ms is None else ms * 1000 / states) for ms in cpu]
            if any(cell != "-" for cell in cells):
                rows.append([name, f"{n:,}", *cells])
    return columns(headers, rows)


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


def server_verdicts(
    samples: Sequence[Sample], ns: Sequence[int], loops: Sequence[str], reference: str
) -> list[Verdict]:
    """A server store: persist-all and cold start of the library against the raw client `reference`."""
    out: list[Verdict] = []
    for loop in loops:
        for n in ns:
            for figure, name in (("persist_all", "persist-all"), ("cold", "cold start")):
                mine = median_of(samples, f"ours {loop}", n, figure)
                theirs = median_of(samples, reference, n, figure)
                cpu = ratio(
                    median_of(samples, f"ours {loop}", n, figure + "_cpu"),
                    median_of(samples, reference, n, figure + "_cpu"),
                )
                target = f"{name} <= {SERVER_TARGET:g}x raw"
                out.append(Verdict(target, loop, f"{n:,}", mine, theirs, SERVER_TARGET, cpu_ratio=cpu))
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
