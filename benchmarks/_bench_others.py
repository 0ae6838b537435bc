"""Optional comparison columns: what a user would otherwise pick to keep many small states in SQLite.

- diskcache: `Cache` (SQLite underneath, its default settings), the changed
  states written in one transaction (`cache.transact()`), each state its
  serialised JSON bytes under its key; loading reads every key and validates.
- LangGraph's `SqliteSaver` (sync): each state a thread whose checkpoint holds
  the state as a JSON-ready dict; `put` commits each checkpoint on its own, as
  LangGraph does; loading calls `get_tuple` per thread and validates.

Both are told which states changed (they have no change detection of their
own). Neither is a dependency: a column is left out when its package is not
importable. Every function returns seconds of its timed section.
"""

from __future__ import annotations

import importlib.util
import shutil
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _bench_cases import WorkerState, changed_indexes, dump, key_of, load, mutate, payloads, stopwatch

DISKCACHE_HINT = (
    "the diskcache column needs diskcache: `.venv/bin/python -m pip install diskcache` (optional)"
)
LANGGRAPH_HINT = (
    "the langgraph column needs LangGraph's SqliteSaver: "
    "`.venv/bin/python -m pip install langgraph-checkpoint-sqlite` (optional)"
)


def diskcache_available() -> bool:
    return importlib.util.find_spec("diskcache") is not None


def langgraph_available() -> bool:
    try:
        return importlib.util.find_spec("langgraph.checkpoint.sqlite") is not None
    except ModuleNotFoundError:
        return False


# -- diskcache -----------------------------------------------------------------


def _diskcache_fill(directory: Path, n: int) -> None:
    import diskcache

    with diskcache.Cache(str(directory)) as cache, cache.transact():
        for i, data in enumerate(payloads(n)):
            cache.set(key_of(i), data)


def diskcache_persist(root: Path, n: int, fractions: Sequence[float]) -> list[float]:
    """Seconds to write the changed states (each fraction in turn) in one transaction."""
    import diskcache

    directory = root / f"diskcache-{uuid.uuid4().hex[:8]}"
    times: list[float] = []
    try:
        _diskcache_fill(directory, n)
        models = [load(data) for data in payloads(n)]
        with diskcache.Cache(str(directory)) as cache:
            for round_no, fraction in enumerate(fractions, 1):
                indexes = changed_indexes(n, fraction)
                for i in indexes:
                    mutate(models[i], round_no)
                with stopwatch(times, sync_disk=True), cache.transact():
                    for i in indexes:
                        cache.set(key_of(i), dump(models[i]))
            last = changed_indexes(n, fractions[-1])[-1]
            if cache.get(key_of(last)) != dump(models[last]):
                raise AssertionError("diskcache did not store the last state")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return times


def diskcache_initialize(root: Path, n: int) -> float:
    """Seconds to open the cache afresh, read every state and validate it."""
    import diskcache

    directory = root / f"diskcache-{uuid.uuid4().hex[:8]}"
    times: list[float] = []
    try:
        _diskcache_fill(directory, n)
        keys = [key_of(i) for i in range(n)]
        with stopwatch(times, sync_disk=True), diskcache.Cache(str(directory)) as cache:
            models = [WorkerState.model_validate_json(cache[key]) for key in keys]
        if models[-1] != load(payloads(n)[-1]):
            raise AssertionError("diskcache did not load the stored model")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return times[0]


# -- LangGraph SqliteSaver -------------------------------------------------------------


def _config(i: int) -> dict[str, Any]:
    return {"configurable": {"thread_id": key_of(i), "checkpoint_ns": ""}}


def _put(saver: Any, i: int, model: WorkerState) -> None:
    from langgraph.checkpoint.base import empty_checkpoint

    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"state": model.model_dump(mode="json")}
    saver.put(_config(i), checkpoint, {"source": "update", "step": 1}, {})


def _saver(path: Path) -> Any:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(str(path), check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()
    return saver


def langgraph_persist(root: Path, n: int, fractions: Sequence[float]) -> list[float]:
    """Seconds to checkpoint the changed states (each fraction in turn), one `put` each."""
    path = root / f"langgraph-{uuid.uuid4().hex[:8]}.sqlite3"
    times: list[float] = []
    try:
        models = [load(data) for data in payloads(n)]
        saver = _saver(path)
        try:
            for i, model in enumerate(models):
                _put(saver, i, model)
            for round_no, fraction in enumerate(fractions, 1):
                indexes = changed_indexes(n, fraction)
                for i in indexes:
                    mutate(models[i], round_no)
                with stopwatch(times, sync_disk=True):
                    for i in indexes:
                        _put(saver, i, models[i])
        finally:
            saver.conn.close()
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return times


def langgraph_initialize(root: Path, n: int) -> float:
    """Seconds to open the saver afresh, fetch every state's latest checkpoint and validate it."""
    path = root / f"langgraph-{uuid.uuid4().hex[:8]}.sqlite3"
    times: list[float] = []
    try:
        saver = _saver(path)
        try:
            for i, data in enumerate(payloads(n)):
                _put(saver, i, load(data))
        finally:
            saver.conn.close()
        with stopwatch(times, sync_disk=True):
            saver = _saver(path)
            try:
                models = [
                    WorkerState.model_validate(
                        saver.get_tuple(_config(i)).checkpoint["channel_values"]["state"]
                    )
                    for i in range(n)
                ]
            finally:
                saver.conn.close()
        if models[-1] != load(payloads(n)[-1]):
            raise AssertionError("LangGraph did not load the stored model")
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return times[0]
