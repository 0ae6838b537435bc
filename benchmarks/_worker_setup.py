"""The data each system of the worker benchmark starts from, made once per size (never timed).

Each system gets a template directory holding N states as it stores them: the
library's records (written through the library), raw sqlite3 rows (the same
JSON bytes), a diskcache `Cache`, a LangGraph `SqliteSaver` database. Every
measurement copies its template to a fresh directory, so no child sees what
another one wrote.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from _worker_child import KVS_NAME, langgraph_put, langgraph_saver, raw_connect, raw_write
from _worker_model import key_of, load, payloads


def prepare_ours(directory: Path, n: int) -> None:
    fill_library(f"sqlite:///{directory / 'state.sqlite3'}", n)


def fill_library(url: str, n: int) -> None:
    """N records written through the library in one batch to the store at `url`, then the backend closed."""
    import anyio

    from recoverable_state import KeyValueStore, open_backend
    from recoverable_state.storage import JSON_CONTENT_TYPE

    async def fill() -> None:
        backend = open_backend(url)
        try:
            kvs = await KeyValueStore.open(name=KVS_NAME, storage=backend)
            puts = [
                (kvs, kvs.prepare_put(key_of(i), data, JSON_CONTENT_TYPE))
                for i, data in enumerate(payloads(n))
            ]
            await KeyValueStore.put_together(puts)
        finally:
            await backend.aclose()

    anyio.run(fill)


def prepare_raw(directory: Path, n: int) -> None:
    conn = raw_connect(directory / "raw.sqlite3")
    try:
        raw_write(conn, [(key_of(i), data) for i, data in enumerate(payloads(n))])
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def prepare_diskcache(directory: Path, n: int) -> None:
    import diskcache

    with diskcache.Cache(str(directory / "diskcache")) as cache, cache.transact():
        for i, data in enumerate(payloads(n)):
            cache.set(key_of(i), data)


def prepare_langgraph(directory: Path, n: int) -> None:
    saver = langgraph_saver(directory / "langgraph.sqlite3")
    try:
        for i, data in enumerate(payloads(n)):
            langgraph_put(saver, i, load(data))
    finally:
        saver.conn.close()


PREPARE = {
    "ours": prepare_ours,
    "raw": prepare_raw,
    "diskcache": prepare_diskcache,
    "langgraph": prepare_langgraph,
}


def template(root: Path, system: str, n: int) -> Path:
    """The template directory of `system` at `n` states, made on first use."""
    directory = root / f"template-{system}-{n}"
    if not directory.exists():
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        PREPARE[system](partial, n)
        partial.rename(directory)
    return directory


def fresh_copy(source: Path, target: Path) -> Path:
    """A copy of a template for one measurement, its pages on disk before the child starts."""
    shutil.copytree(source, target)
    os.sync()
    return target
