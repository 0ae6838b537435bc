"""Timing shared by every worker-benchmark child: wall and CPU clocks, and the two timed rounds.

Its own module, so that the library's child (`_worker_child.py`) and the raw
server clients (`_worker_raw_servers.py`) share it without importing each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from _worker_model import WorkerState, changed_indexes, dump, mutate

FRACTIONS = (1.0, 0.01)

Clock = tuple[float, float]


def clock() -> Clock:
    """Wall time and this process's CPU time (every thread's), now."""
    return time.perf_counter(), time.process_time()


def record(out: dict[str, Any], name: str, start: Clock) -> None:
    """`out[name]`: wall seconds since `start`; `out[name + "_cpu"]`: CPU seconds since then."""
    out[name] = time.perf_counter() - start[0]
    out[name + "_cpu"] = time.process_time() - start[1]


def timed_rounds(
    out: dict[str, Any],
    n: int,
    values: list[WorkerState],
    write: Callable[[range], None],
    read: Callable[[int], bytes],
) -> None:
    """Persist-all then 1%: mutate, time `write` over the changed indexes, check the last one."""
    for round_no, (name, fraction) in enumerate(
        zip(("persist_all", "persist_1pct"), FRACTIONS, strict=True), 1
    ):
        indexes = changed_indexes(n, fraction)
        for i in indexes:
            mutate(values[i], round_no)
        start = clock()
        write(indexes)
        record(out, name, start)
        if read(indexes[-1]) != dump(values[indexes[-1]]):
            raise AssertionError(f"{name}: the last changed state was not stored")
