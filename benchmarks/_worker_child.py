"""One measurement in a process of its own: what a worker pays, started as after a deploy.

    python benchmarks/_worker_child.py SYSTEM N DIR [--loop asyncio|trio] [--heartbeat] [--profile PREFIX]
        [--url URL]

SYSTEM is `ours`, `raw`, `diskcache` or `langgraph`; DIR holds a fresh copy of
the data that system stored for N states (made by `_worker_setup.py`). With
`--url` (a `postgresql://` or `redis://` URL of a fresh database holding that
data, made by `_worker_servers.py`), `ours` opens the library on it and `raw`
is the server's raw client (`_worker_raw_servers.py`); DIR is then unused. The
child imports what its system needs, then times, in order:

- cold: from after the imports to every state's value in hand (for the library:
  the constructors, `initialize_many` and the first `current_value` of each);
- persist_all: every state changed, from the emit (or the first write) to every
  write durable;
- persist_1pct: one state in a hundred changed, the same.

`--heartbeat` (ours only): a task sleeping 1 ms in a loop runs during the first
persist (every state changed) and the longest it waited is reported, from the
emit on (the changes themselves, made before, are the worker's own wait). The
collector is left as an application leaves it. The last line on stdout is
`RESULT {json}`; anything else, or a non-zero exit, is a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _worker_model import WorkerState, changed_indexes, dump, key_of, mutate  # noqa: E402
from _worker_timing import FRACTIONS, Clock, clock, record, timed_rounds  # noqa: E402

KVS_NAME = "bench"


@contextmanager
def profiled(path: Path | None) -> Iterator[None]:
    """cProfile the block into `path` (main thread only), or do nothing."""
    if path is None:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(path)


# -- the library ---------------------------------------------------------------------


def run_ours(n: int, url: str, loop: str, heartbeat: bool, profile: Path | None) -> dict[str, Any]:
    import anyio

    from recoverable_state import (
        Event,
        EventManager,
        EventPersistStateData,
        KeyValueStore,
        RecoverableState,
        open_backend,
        service_locator,
    )

    never = 24 * 3600.0
    out: dict[str, Any] = {}

    async def emit_persist(manager: EventManager) -> None:
        manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
        await manager.wait_for_all_listeners_to_complete()

    async def check(backend: Any, i: int, model: WorkerState) -> None:
        kvs = await KeyValueStore.open(name=KVS_NAME, storage=backend)
        record = await kvs.get_record(key_of(i))
        if record is None or record.value != dump(model):
            raise AssertionError(f"record {key_of(i)} does not hold the last persisted model")

    def change(round_no: int, values: list[WorkerState]) -> None:
        """The worker's own changes before a persist (never timed, nor in the heartbeat)."""
        for i in changed_indexes(n, FRACTIONS[round_no - 1]):
            mutate(values[i], round_no)

    async def timed_persist(manager: EventManager, name: str) -> None:
        start = clock()
        with profiled(phase(name)):
            await emit_persist(manager)
        record(out, name, start)

    async def with_heartbeat(manager: EventManager, values: list[WorkerState]) -> None:
        longest = 0.0
        stop = anyio.Event()

        async def beat() -> None:
            nonlocal longest
            while not stop.is_set():
                start = time.perf_counter()
                await anyio.sleep(0.001)
                longest = max(longest, time.perf_counter() - start - 0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(beat)
            # Changing 100,000 states holds the loop 0.2-0.3 s: that wait is the worker's own.
            change(1, values)
            await anyio.sleep(0.01)
            longest = 0.0
            await timed_persist(manager, "persist_all")
            stop.set()
        out["heartbeat"] = longest

    def phase(name: str) -> Path | None:
        return None if profile is None else profile.with_name(f"{profile.name}-{name}.prof")

    async def main(started: Clock) -> None:
        cold_profile = profiled(phase("cold"))
        cold_profile.__enter__()  # the manager stays entered after the cold start: no `with` here
        backend = open_backend(url)
        service_locator.set_storage(backend)
        async with EventManager(persist_state_interval=never, close_timeout=600.0) as manager:
            default = WorkerState(worker_id=-1)
            states = [
                RecoverableState(
                    default_state=default,
                    persist_state_key=key_of(i),
                    persistence_enabled=True,
                    persist_state_kvs_name=KVS_NAME,
                    event_manager=manager,
                )
                for i in range(n)
            ]
            await RecoverableState.initialize_many(states)
            values = [state.current_value for state in states]
            record(out, "cold", started)
            cold_profile.__exit__(None, None, None)
            if values[-1].worker_id != n - 1:
                raise AssertionError("the last state did not load its stored model")
            if heartbeat:
                await with_heartbeat(manager, values)
            else:
                change(1, values)
                await timed_persist(manager, "persist_all")
            await check(backend, n - 1, values[-1])
            if not heartbeat:
                change(2, values)
                await timed_persist(manager, "persist_1pct")
                last = changed_indexes(n, FRACTIONS[1])[-1]
                await check(backend, last, values[last])
            for state in states:
                await state.teardown()
        await backend.aclose()

    import_driver(url)
    anyio.run(main, clock(), backend=loop)
    return out


def import_driver(url: str) -> None:
    """The server's client, imported before the clock as the raw child imports it (the library's own
    modules for the scheme still load inside the cold start, as `_sqlite.py` does on SQLite)."""
    if url.startswith("postgresql://"):
        import psycopg  # noqa: F401
    elif url.startswith("redis://"):
        import redis  # noqa: F401


# -- raw sqlite3 ---------------------------------------------------------------------

RAW_UPSERT = (
    "INSERT INTO records (store_id, key, value, content_type, version, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, key) DO UPDATE SET "
    "value = excluded.value, content_type = excluded.content_type, "
    "version = excluded.version, updated_at = excluded.updated_at"
)


def raw_connect(path: Path) -> Any:
    """sqlite3 with the library's pragmas: WAL, synchronous=FULL, a 64 MiB cache."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS records (store_id TEXT NOT NULL, key TEXT NOT NULL, "
        "value BLOB NOT NULL, content_type TEXT NOT NULL, version INTEGER NOT NULL, "
        "updated_at REAL NOT NULL, PRIMARY KEY (store_id, key))"
    )
    return conn


def raw_write(conn: Any, rows: list[tuple[str, bytes]]) -> None:
    """Every row in one transaction, durable on COMMIT."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(RAW_UPSERT, [("raw", key, value, "application/json", 1, now) for key, value in rows])
    conn.execute("COMMIT")


def run_raw(n: int, directory: Path) -> dict[str, Any]:
    path = directory / "raw.sqlite3"
    started = clock()
    conn = raw_connect(path)
    found = dict(conn.execute("SELECT key, value FROM records WHERE store_id = 'raw'"))
    values = [WorkerState.model_validate_json(found[key_of(i)]) for i in range(n)]
    out: dict[str, Any] = {}
    record(out, "cold", started)
    del found

    def write(indexes: range) -> None:
        raw_write(conn, [(key_of(i), dump(values[i])) for i in indexes])

    def read(i: int) -> bytes:
        row = conn.execute("SELECT value FROM records WHERE store_id = 'raw' AND key = ?", (key_of(i),))
        return bytes(row.fetchone()[0])

    timed_rounds(out, n, values, write, read)
    conn.close()
    return out


# -- diskcache -----------------------------------------------------------------------


def run_diskcache(n: int, directory: Path) -> dict[str, Any]:
    import diskcache

    started = clock()
    cache = diskcache.Cache(str(directory / "diskcache"))
    values = [WorkerState.model_validate_json(cache[key_of(i)]) for i in range(n)]
    out: dict[str, Any] = {}
    record(out, "cold", started)

    def write(indexes: range) -> None:
        with cache.transact():
            for i in indexes:
                cache.set(key_of(i), dump(values[i]))

    timed_rounds(out, n, values, write, lambda i: bytes(cache[key_of(i)]))
    cache.close()
    return out


# -- LangGraph SqliteSaver -----------------------------------------------------------


def langgraph_config(i: int) -> dict[str, Any]:
    return {"configurable": {"thread_id": key_of(i), "checkpoint_ns": ""}}


def langgraph_put(saver: Any, i: int, model: WorkerState) -> None:
    """One checkpoint holding the state as a JSON-ready dict; `put` commits it on its own."""
    from langgraph.checkpoint.base import empty_checkpoint

    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"state": model.model_dump(mode="json")}
    saver.put(langgraph_config(i), checkpoint, {"source": "update", "step": 1}, {})


def langgraph_saver(path: Path) -> Any:
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    saver = SqliteSaver(sqlite3.connect(str(path), check_same_thread=False))
    saver.setup()
    return saver


def run_langgraph(n: int, directory: Path) -> dict[str, Any]:
    import langgraph.checkpoint.base
    import langgraph.checkpoint.sqlite  # noqa: F401

    started = clock()
    saver = langgraph_saver(directory / "langgraph.sqlite3")
    values = [
        WorkerState.model_validate(saver.get_tuple(langgraph_config(i)).checkpoint["channel_values"]["state"])
        for i in range(n)
    ]
    out: dict[str, Any] = {}
    record(out, "cold", started)

    def write(indexes: range) -> None:
        for i in indexes:
            langgraph_put(saver, i, values[i])

    def read(i: int) -> bytes:
        state = saver.get_tuple(langgraph_config(i)).checkpoint["channel_values"]["state"]
        return dump(WorkerState.model_validate(state))

    timed_rounds(out, n, values, write, read)
    saver.conn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("system", choices=("ours", "raw", "diskcache", "langgraph"))
    parser.add_argument("n", type=int)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--loop", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--heartbeat", action="store_true")
    parser.add_argument(
        "--profile",
        type=Path,
        help="ours: cProfile each timed phase into PREFIX-{cold,persist_all,persist_1pct}.prof",
    )
    parser.add_argument("--url", help="a PostgreSQL or Redis database holding the data (instead of DIR)")
    args = parser.parse_args(argv)
    if args.system == "ours":
        url = args.url or f"sqlite:///{args.directory / 'state.sqlite3'}"
        result = run_ours(args.n, url, args.loop, args.heartbeat, args.profile)
    elif args.system == "raw" and args.url:
        from _worker_raw_servers import run_raw_server

        result = run_raw_server(args.n, args.url)
    elif args.system == "raw":
        result = run_raw(args.n, args.directory)
    elif args.system == "diskcache":
        result = run_diskcache(args.n, args.directory)
    else:
        result = run_langgraph(args.n, args.directory)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
