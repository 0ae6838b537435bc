"""A parent that forks while its backend is busy; each child uses the inherited backend.

Usage: fork_worker.py URL MODE CHILDREN CHILD_LOOP PARENT_LOOP (`locked` needs a sqlite:/// URL;
`connecting` a server's, and the pids of its processes in RS_FORK_PAUSE, comma-separated)

MODE `busy`: a task writes batches without pause while the loop thread forks
(multiprocessing's `fork` start method), so that most forks find the writer
thread inside a transaction. MODE `locked`: another connection holds
`BEGIN EXCLUSIVE`, so that a write of the parent is stuck in SQLite's busy
wait (holding the backend and a group-commit batch) when the children are
forked. MODE `thread`: `busy`, but `os.fork()` is called from a plain thread.
MODE `connecting`: the server's processes are stopped (SIGSTOP) while the
parent makes its first call, so that the backend is connecting (its lock held,
no reply yet) when the children are forked; they are let go on after that.

Each child opens the parent's store on the inherited backend, writes a key of
its own, reads it back and prints one line: `CHILD <n> ok <seconds>` or `CHILD <n> error <type>: <message>`.
The parent prints `PARENT ok` when its own writes went on and read back as
written, and (PostgreSQL) its sessions outlived the children: a child that
closed them (libpq's Terminate) or talked on them would have ended or broken them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import sys
import threading
import time

import anyio

from recoverable_state import KeyValueStore, StorageError, open_backend


def say(line: str) -> None:
    """One line on stdout in one write: the lines of processes sharing the pipe never interleave."""
    os.write(1, (line + "\n").encode())


async def _child_work(backend: object, n: int) -> str:
    start = time.monotonic()
    try:
        with anyio.fail_after(20):
            # The parent's own store: its lock (a file store's) may be held by the parent at the fork.
            kvs = await KeyValueStore.open(name="parent", storage=backend)  # type: ignore[arg-type]
            await kvs.set_value(f"child-{n}", {"child": n, "pid": os.getpid()})
            got = await kvs.get_value(f"child-{n}")
            assert got == {"child": n, "pid": os.getpid()}, got
    except StorageError as exc:
        return f"CHILD {n} error {type(exc).__name__}: {exc} ({time.monotonic() - start:.2f})"
    except TimeoutError:
        return f"CHILD {n} hung"
    return f"CHILD {n} ok {time.monotonic() - start:.2f}"


def child(backend: object, n: int, loop: str) -> None:
    # A thread of its own: forked from inside the parent's loop, this thread still
    # counts as running that loop (sniffio), and anyio.run would refuse.
    lines: list[str] = []
    t = threading.Thread(target=lambda: lines.append(anyio.run(_child_work, backend, n, backend=loop)))
    t.start()
    t.join()
    say(lines[0] if lines else f"CHILD {n} crashed")


def fork_child(backend: object, n: int, loop: str) -> int:
    """os.fork() by hand: the child does its work and leaves with os._exit."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(backend, n, loop)
        except BaseException as exc:
            say(f"CHILD {n} crashed {exc!r}")
            code = 1
        finally:
            os._exit(code)
    return pid


def start_child(backend: object, n: int, loop: str, mode: str) -> int:
    """Fork child `n`: by multiprocessing from this thread, or by os.fork() from a plain thread."""
    if mode != "thread":
        proc = multiprocessing.get_context("fork").Process(target=child, args=(backend, n, loop))
        proc.start()
        assert proc.pid is not None
        _procs[proc.pid] = proc
        return proc.pid
    box: list[int] = []
    thread = threading.Thread(target=lambda: box.append(fork_child(backend, n, loop)))
    thread.start()
    thread.join()
    return box[0]


_procs: dict[int, multiprocessing.process.BaseProcess] = {}
"""The children multiprocessing started, by pid: it reaps them itself (waitpid would find none)."""


def reap(pids: list[int]) -> None:
    """Wait for every child, 40 s in all; one still running then is killed (and reported)."""
    deadline = time.monotonic() + 40
    for pid in pids:
        proc = _procs.get(pid)
        if proc is not None:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                say(f"CHILD pid {pid} still running: killed")
                proc.kill()
                proc.join()
            continue
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            say(f"CHILD pid {pid} still running: killed")
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def sessions(backend: object) -> set[int]:
    """The server sessions of a PostgreSQL backend's idle pooled connections (none for others)."""
    pool = getattr(backend, "_pool", None)
    return {conn.info.backend_pid for conn in getattr(pool, "_idle", ())}


async def connecting(backend: object, children: int, child_loop: str) -> list[int]:
    """Fork the children while the parent's first call waits on a stopped server."""
    paused = [int(pid) for pid in os.environ["RS_FORK_PAUSE"].split(",")]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: KeyValueStore.open(name="parent", storage=backend))  # type: ignore[arg-type]
            await anyio.sleep(0.3)
            forked = [start_child(backend, n, child_loop, "connecting") for n in range(children)]
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    return forked


async def parent(url: str, mode: str, children: int, child_loop: str) -> None:
    backend = open_backend(url)
    if mode == "connecting":
        forked = await connecting(backend, children, child_loop)
        await anyio.to_thread.run_sync(reap, forked)
    kvs = await KeyValueStore.open(name="parent", storage=backend)
    await kvs.set_value("warm", 1)
    stop = anyio.Event()
    written = 0
    last: dict[str, int] = {}

    async def writer() -> None:
        nonlocal written
        blob = "x" * 2000
        while not stop.is_set():
            n, written = written, written + 1
            await kvs.set_value(f"k{n % 50}", {"n": n, "blob": blob})
            last[f"k{n % 50}"] = max(last.get(f"k{n % 50}", -1), n)

    lock: sqlite3.Connection | None = None
    async with anyio.create_task_group() as tg:
        if mode == "locked":
            lock = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=10)
            lock.execute("BEGIN EXCLUSIVE")
            tg.start_soon(kvs.set_value, "stuck", "waits for the exclusive lock")
            await anyio.sleep(0.3)  # the write is in SQLite's busy wait now
        else:
            for _ in range(4):
                tg.start_soon(writer)
            await anyio.sleep(0.3)
        kept = sessions(backend)
        forked = []
        for n in range(children if mode != "connecting" else 0):
            forked.append(start_child(backend, n, child_loop, mode))
            await anyio.sleep(0.01)
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        await anyio.to_thread.run_sync(reap, forked)
        before = written
        await anyio.sleep(0.2)
        assert mode == "locked" or written > before, "the parent's writes stopped"
        stop.set()
    await kvs.set_value("after", "the parent still writes")
    assert await kvs.get_value("after") == "the parent still writes"
    for key, n in last.items():  # the parent's last write of each key reads back
        value = await kvs.get_value(key)
        assert value is not None and value["n"] == n, (key, n, value)
    lost = kept - sessions(backend)
    assert not lost, f"the parent's sessions {sorted(lost)} did not outlive the children"
    await backend.aclose()
    say("PARENT ok")


if __name__ == "__main__":
    url, mode, count, child_loop, parent_loop = sys.argv[1:6]
    anyio.run(parent, url, mode, int(count), child_loop, backend=parent_loop)
