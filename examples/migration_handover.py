"""Two "machines" hand a job over through a migration, on a shared Redis or PostgreSQL.

Machine A works on a job and saves its progress. Machine B starts (as a
rescheduled pod would, elsewhere) and loads the job: from that moment B owns it.
A, still running (a slow shutdown, a network partition), finds on its next save
that it no longer owns the job, stops working, and never overwrites B's progress.

    python examples/migration_handover.py --storage-url redis://127.0.0.1:6379/0
    python examples/migration_handover.py --storage-url postgresql://postgres@127.0.0.1:5432/postgres

Each machine is a separate process; A and B may be given different URLs that
reach the same server (`--storage-url-b`), as two hosts would.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import timedelta

import anyio
from pydantic import BaseModel

from recoverable_state import (
    Event,
    EventManager,
    EventStateOwnershipLostData,
    KeyValueStore,
    RecoverableState,
    open_backend,
    service_locator,
)


class Job(BaseModel):
    processed: int = 0
    last_machine: str | None = None


async def machine(name: str, url: str, goal: int) -> None:
    service_locator.set_storage(open_backend(url))
    events = EventManager(persist_state_interval=timedelta(milliseconds=200))
    service_locator.set_event_manager(events)
    taken_over = anyio.Event()

    async def on_lost(data: EventStateOwnershipLostData) -> None:
        print(f"[{name}] {data.key!r} was taken over by another machine: stopping", flush=True)
        taken_over.set()

    events.on(event=Event.STATE_OWNERSHIP_LOST, listener=on_lost)
    async with events:
        state = RecoverableState(
            default_state=Job(), persist_state_key="handover-job", persistence_enabled=True
        )
        job = await state.initialize()
        print(f"[{name}] starting at item {job.processed} (last saved by {job.last_machine})", flush=True)
        async with anyio.create_task_group() as tg:

            async def work() -> None:
                while job.processed < goal:
                    await anyio.sleep(0.05)
                    job.processed += 1
                    job.last_machine = name
                tg.cancel_scope.cancel()

            async def stop_when_taken_over() -> None:
                await taken_over.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(work)
            tg.start_soon(stop_when_taken_over)
        if taken_over.is_set():
            print(f"[{name}] stopped at item {job.processed}; that progress is not saved", flush=True)
        else:
            await state.teardown()
            print(f"[{name}] finished the job: {job.processed} items", flush=True)
    await service_locator.get_storage().aclose()


async def forget_the_job(url: str) -> None:
    backend = open_backend(url)
    kvs = await KeyValueStore.open(storage=backend)
    await kvs.delete_value("handover-job")
    await backend.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage-url", required=True, help="Redis or PostgreSQL URL of machine A")
    parser.add_argument("--storage-url-b", help="URL machine B uses for the same server (default: the same)")
    parser.add_argument("--goal", type=int, default=60)
    parser.add_argument("--machine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.machine:
        anyio.run(machine, args.machine, args.storage_url, args.goal)
        return

    def start(name: str, url: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, __file__, "--machine", name, "--storage-url", url, "--goal", str(args.goal)]
        return subprocess.Popen(cmd)

    anyio.run(forget_the_job, args.storage_url)  # start the demo from scratch
    a = start("A", args.storage_url)
    time.sleep(2.0)  # A works for a while; then the job is rescheduled elsewhere
    b = start("B", args.storage_url_b or args.storage_url)
    code_a, code_b = a.wait(timeout=60), b.wait(timeout=60)
    sys.exit(code_a or code_b)


if __name__ == "__main__":
    main()
