"""A worker that counts work items and picks up where it left off.

Run it, stop it with Ctrl-C whenever you like, run it again: it resumes from
the last item it counted. By default a run takes about 30 s (100 items), time
enough to try Ctrl-C. Its state lives in ./storage/state.sqlite3 (set
RECOVERABLE_STATE_STORAGE_URL to keep it elsewhere).

    python examples/counter_worker.py --items 30
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import anyio
from pydantic import BaseModel

from recoverable_state import EventManager, RecoverableState, service_locator


class Counter(BaseModel):
    processed: int = 0
    last_item: str | None = None


async def main(items: int, delay: float) -> None:
    # handle_signals: Ctrl-C (SIGINT) or SIGTERM persist the state before the process ends.
    events = EventManager(persist_state_interval=timedelta(seconds=2), handle_signals=True)
    service_locator.set_event_manager(events)
    async with events:
        state = RecoverableState(
            default_state=Counter(), persist_state_key="counter-worker", persistence_enabled=True
        )
        async with state as counter:
            if counter.processed:
                print(f"resuming after item {counter.processed} ({counter.last_item})", flush=True)
            else:
                print("starting from scratch", flush=True)
            print("Ctrl-C stops me (my state is saved first); run me again to resume", flush=True)
            goal = counter.processed + items
            try:
                while counter.processed < goal:
                    await anyio.sleep(delay)  # the "work"
                    counter.processed += 1
                    counter.last_item = f"item-{counter.processed}"
                    print(f"processed {counter.last_item}", flush=True)
            except anyio.get_cancelled_exc_class():
                # Ctrl-C or SIGTERM: the manager cancels the work, then saves every state.
                print(f"stopping after {counter.processed} items: saving; run me again to resume", flush=True)
                raise
            print(f"done for now: {counter.processed} items in total; run me again to go on", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="items to process this run")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds of work per item")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.items, args.delay, backend=args.backend)
