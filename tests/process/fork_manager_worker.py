"""A parent inside its event manager forks children that use the same (default) manager.

Usage: fork_manager_worker.py LOOP CHILDREN

The parent enters the default manager and holds a state under `parent`; while
it runs, it forks CHILDREN children (multiprocessing's `fork`). Each child
enters the manager it inherited in a loop of its own, keeps a state under
`child-<n>`, persists and leaves, then prints `CHILD <n> <stored value>`. The
parent then changes its own state, tears it down and prints `PARENT <stored value>`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading

import anyio
import anyio.to_thread
from pydantic import BaseModel

from recoverable_state import KeyValueStore, RecoverableState, service_locator


class Count(BaseModel):
    n: int = 0


def say(line: str) -> None:
    """One line on stdout in one write: the lines of processes sharing the pipe never interleave."""
    os.write(1, (line + "\n").encode())


async def child_main(n: int) -> object:
    with anyio.fail_after(15):
        async with service_locator.get_event_manager():
            state = RecoverableState(
                default_state=Count(), persist_state_key=f"child-{n}", persistence_enabled=True
            )
            (await state.initialize()).n = 100 + n
            await state.persist_state()
            await state.teardown()
        return await (await KeyValueStore.open()).get_value(f"child-{n}")


def child(n: int, loop: str) -> None:
    # A thread of its own: forked from inside the parent's loop, this thread still counts as running it.
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(anyio.run(child_main, n, backend=loop)))
    thread.start()
    thread.join()
    say(f"CHILD {n} {out[0] if out else 'failed'}")


async def parent(loop: str, children: int) -> None:
    async with service_locator.get_event_manager():
        state = RecoverableState(default_state=Count(), persist_state_key="parent", persistence_enabled=True)
        value = await state.initialize()
        procs = []
        for _ in range(children):
            value.n += 1  # changed, not yet saved, at each fork: a child must not save it
            proc = multiprocessing.get_context("fork").Process(target=child, args=(len(procs), loop))
            proc.start()
            procs.append(proc)
        for proc in procs:
            await anyio.to_thread.run_sync(proc.join, 40)
            if proc.is_alive():
                proc.kill()
                say(f"CHILD pid {proc.pid} killed")
        value.n = 1000
        await state.teardown()
    say(f"PARENT {await (await KeyValueStore.open()).get_value('parent')}")


if __name__ == "__main__":
    anyio.run(parent, sys.argv[1], int(sys.argv[2]), backend=sys.argv[1])
