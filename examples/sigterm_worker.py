"""A worker that survives SIGTERM: stop it with `kill -TERM`, start it again, it resumes.

    python examples/sigterm_worker.py &        # prints its pid and works
    kill -TERM <pid>                           # "SIGTERM received: persisting..." then exit 143
    python examples/sigterm_worker.py          # "resuming at page 57 of crawl ..."

`recoverable_state.run` runs `main` inside an EventManager that handles SIGTERM
and SIGINT: on either, the work is cancelled, every state is saved, and the
process exits with 143 (SIGTERM) or 130 (SIGINT) within
RECOVERABLE_STATE_SHUTDOWN_TIMEOUT seconds (25 by default). Ctrl-C works the
same way; press it twice to quit at once without saving. The states live in
./storage/state.sqlite3 (RECOVERABLE_STATE_STORAGE_URL to keep them elsewhere).
"""

from __future__ import annotations

import argparse
import os

import anyio
from pydantic import BaseModel

import recoverable_state
from recoverable_state import Event, EventMigratingData, RecoverableState, service_locator


class Crawl(BaseModel):
    """How far one crawl has got."""

    next_page: int = 1
    pages_seen: list[int] = []


async def crawl(progress: Crawl, delay: float) -> None:
    while True:
        await anyio.sleep(delay)  # fetch and process one page
        progress.pages_seen = [*progress.pages_seen[-4:], progress.next_page]
        progress.next_page += 1


async def main(crawls: int, delay: float) -> None:
    told = anyio.Event()

    # Async, so it runs on the event loop like the rest of the worker: its line is
    # printed whole, never into the middle of another (a sync listener runs in a thread).
    async def on_migrating(data: EventMigratingData) -> None:
        left = f"{data.time_remaining.total_seconds():.0f} s" if data.time_remaining else "unknown time"
        print(f"migrating ({left} left): saving every crawl", flush=True)
        told.set()

    async def on_aborting() -> None:
        print("aborting (Ctrl-C): saving every crawl", flush=True)
        told.set()

    events = service_locator.get_event_manager()
    events.on(event=Event.MIGRATING, listener=on_migrating)
    events.on(event=Event.ABORTING, listener=on_aborting)
    states = [
        RecoverableState(default_state=Crawl(), persist_state_key=f"crawl-{i}", persistence_enabled=True)
        for i in range(crawls)
    ]
    await RecoverableState.initialize_many(states)
    print(f"pid {os.getpid()}: stop me with `kill -TERM {os.getpid()}` or Ctrl-C", flush=True)
    for state in states:
        progress = state.current_value
        where = f"resuming at page {progress.next_page}" if progress.next_page > 1 else "starting"
        print(f"{where} of {state.persist_state_key}", flush=True)
    try:
        async with anyio.create_task_group() as tg:
            for state in states:
                tg.start_soon(crawl, state.current_value, delay)
    finally:
        # Runs when a signal cancels the work; the states are saved right after. The
        # signal's listener above runs concurrently: let its line come first.
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await told.wait()
        pages = ", ".join(f"{s.persist_state_key}: page {s.current_value.next_page}" for s in states)
        print(f"stopping at {pages}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crawls", type=int, default=3, help="crawls to run side by side")
    parser.add_argument("--delay", type=float, default=0.1, help="seconds per page")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    # Saved every 5 s too, so that even a SIGKILL loses at most 5 s of work.
    recoverable_state.run(main, args.crawls, args.delay, backend=args.backend, persist_state_interval=5)
