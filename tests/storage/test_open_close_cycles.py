"""Many stores open at once, and many open/close cycles: threads and file descriptors stay flat."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

from recoverable_state import KeyValueStore
from recoverable_state.storage import open_backend

pytestmark = pytest.mark.anyio


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def url(kind: str, path: Path) -> str:
    return f"sqlite:///{path}.sqlite3" if kind == "sqlite" else f"file://{path}"


async def cycle(kind: str, path: Path, n: int) -> None:
    async with open_backend(url(kind, path)) as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        await kvs.set_value("k", {"cycle": n})
        assert await kvs.get_value("k") == {"cycle": n}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("kind", ["sqlite", "file"])
async def test_a_thousand_open_close_cycles_leave_no_thread_and_no_descriptor(
    tmp_path: Path, kind: str
) -> None:
    await cycle(kind, tmp_path / "db", -1)  # warm: the loop's worker threads, imports
    gc.collect()
    fds, threads = open_fds(), threading.active_count()
    for n in range(1000):
        await cycle(kind, tmp_path / "db", n)
    gc.collect()
    assert open_fds() == fds
    assert threading.active_count() <= threads + 1  # an idle worker of the loop's pool, at most


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("kind", ["sqlite", "file"])
async def test_fifty_backends_open_at_once_all_work_and_all_close(tmp_path: Path, kind: str) -> None:
    await cycle(kind, tmp_path / "warm", -1)
    gc.collect()
    fds, threads = open_fds(), threading.active_count()
    backends = [open_backend(url(kind, tmp_path / f"s{i}")) for i in range(50)]
    try:
        stores = [await KeyValueStore.open(name="jobs", storage=b) for b in backends]
        await KeyValueStore.put_together(
            [(kvs, kvs.prepare_put("k", str(i).encode(), "application/json")) for i, kvs in enumerate(stores)]
        )
        assert [await kvs.get_value("k") for kvs in stores] == list(range(50))
    finally:
        for backend in backends:
            await backend.aclose()
    del stores, backends
    gc.collect()
    assert open_fds() == fds
    assert threading.active_count() <= threads + 1
