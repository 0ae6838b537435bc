"""One measurement of benchmarks/deltas.py, in a process of its own (see there).

    _deltas_child.py setup URL RAW_DB TICKS       # the big state, TICKS ticks of deltas, and its raw copy
    _deltas_child.py lib URL LOOP TICKS DELTAS    # cold start, then TICKS ticks (DELTAS: 1 deltas, 0 whole)
    _deltas_child.py raw RAW_DB                   # the raw read of the same JSON

Prints one JSON object: the figures of this run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

SCALE = float(os.environ.get("DELTAS_BENCH_SCALE", "1"))  # --smoke makes the state small
ENTRIES = int(1_000_000 * SCALE)
LINES = int(100_000 * SCALE)
CHANGED = 200  # dict entries set per tick
APPENDED = 20  # lines appended per tick


class Crawl(BaseModel):
    """About 25 MB of JSON: a crawler's seen URLs and its log."""

    seen: dict[str, int] = {}
    lines: list[str] = []
    ticks: int = 0


def big() -> Crawl:
    return Crawl(
        seen={f"/p/{i}": i for i in range(ENTRIES)},
        lines=[f"{i:08d} fetched /p/{i} in 120 ms" for i in range(LINES)],
    )


def tick(value: Crawl) -> None:
    """One tick's news: 200 entries set (new and changed), 20 lines appended."""
    t = value.ticks = value.ticks + 1
    for j in range(CHANGED):
        value.seen[f"/p/{(t * 7919 + j * 104729) % (ENTRIES * 2)}"] = t
    for j in range(APPENDED):
        value.lines.append(f"tick {t} line {j}")


def written_bytes() -> int:
    """Bytes this process has sent to the storage layer (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def wal_bytes(url: str) -> int | None:
    """The size of a SQLite store's -wal file (0 when there is none); None for other stores."""
    if not url.startswith("sqlite:///"):
        return None
    wal = Path(url.removeprefix("sqlite:///") + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def _state(kvs: Any, deltas: bool) -> Any:
    from recoverable_state import RecoverableState

    async def factory() -> Any:
        return kvs

    return RecoverableState(
        default_state=Crawl,
        persist_state_key="crawl",
        persistence_enabled="explicit_only",
        persist_state_kvs_factory=factory,
        persistence_timeout=None,
        deltas=deltas,
    )


async def setup(url: str, raw_db: str, ticks: int) -> dict[str, Any]:
    from recoverable_state.storage import KeyValueStore, open_backend

    storage = open_backend(url)
    kvs = await KeyValueStore.open(name="bench", storage=storage)
    state = _state(kvs, True)
    value = await state.initialize()
    value.seen.update(big().seen)
    value.lines.extend(big().lines)
    await state.persist_state()
    for _ in range(ticks):
        tick(value)
        await state.persist_state()
    await state.teardown()
    whole = await kvs.get_record("crawl")
    assert whole is not None
    conn = sqlite3.connect(raw_db)
    conn.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB)")
    conn.execute("INSERT OR REPLACE INTO records VALUES (?, ?)", ("crawl", whole.value))
    conn.commit()
    conn.close()
    await storage.aclose()
    return {"json_bytes": len(whole.value)}


async def lib(url: str, ticks: int, deltas: bool) -> dict[str, Any]:
    from recoverable_state.storage import KeyValueStore, open_backend

    started = time.perf_counter()
    storage = open_backend(url)
    kvs = await KeyValueStore.open(name="bench", storage=storage)
    state = _state(kvs, deltas)
    await state.initialize()
    value = state.current_value
    cold = time.perf_counter() - started
    waits: list[float] = []
    running = True

    async def heartbeat() -> None:
        while running:
            before = time.perf_counter()
            await anyio.sleep(0.001)
            waits.append(time.perf_counter() - before - 0.001)

    times = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        await anyio.sleep(0.05)
        waits.clear()
        io_before = written_bytes()
        for _ in range(ticks):
            tick(value)
            begun = time.perf_counter()
            await state.persist_state()
            times.append(time.perf_counter() - begun)
        io_after = written_bytes()
        wal = wal_bytes(url)
        running = False
    record = await kvs.get_record("crawl", chain=True)
    assert record is not None
    await state.teardown()
    await storage.aclose()
    return {
        "cold_ms": cold * 1000,
        "tick_ms": sorted(times)[len(times) // 2] * 1000,
        "bytes_per_tick": (io_after - io_before) / ticks,
        "heartbeat_ms": max(waits) * 1000 if waits else 0.0,
        "wal_bytes": wal,
        "stored_as": record.content_type.split(";")[0],
    }


def raw(raw_db: str) -> dict[str, Any]:
    started = time.perf_counter()
    conn = sqlite3.connect(raw_db)
    (data,) = conn.execute("SELECT value FROM records WHERE key = ?", ("crawl",)).fetchone()
    value = json.loads(data)
    elapsed = time.perf_counter() - started
    assert len(value["seen"]) >= ENTRIES
    conn.close()
    return {"cold_ms": elapsed * 1000}


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "setup":
        out = anyio.run(setup, argv[1], argv[2], int(argv[3]))
    elif mode == "lib":
        out = anyio.run(lib, argv[1], int(argv[3]), argv[4] == "1", backend=argv[2])
    else:
        out = raw(argv[1])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
