"""One of two processes sharing a SQLite file: a state under KEY, persisted on command.

Usage: sqlite_pair_worker.py DB KEY LOOP MODE
MODE `loop N`: persist N times (n = 1..N) and leave. MODE `wait`: persist once
(n + 1), print READY, then on each stdin line add one and persist, printing
PERSISTED <n> or LOST <message>.
"""

from __future__ import annotations

import sys

import anyio
import anyio.to_thread
from pydantic import BaseModel

from recoverable_state import (
    EventManager,
    KeyValueStore,
    RecoverableState,
    StateOwnershipLost,
    open_backend,
)


class Count(BaseModel):
    n: int = 0


async def main(db: str, key: str, mode: str, rounds: int) -> None:
    backend = open_backend(f"sqlite:///{db}")
    async with EventManager(persist_state_interval=3600) as manager:
        state = RecoverableState(
            default_state=Count(),
            persist_state_key=key,
            persistence_enabled=True,
            event_manager=manager,
            persist_state_kvs_factory=lambda: KeyValueStore.open(name="pair", storage=backend),
        )
        value = await state.initialize()
        print(f"LOADED {value.n}", flush=True)
        if mode == "loop":
            for _ in range(rounds):
                value.n += 1
                await state.persist_state()
            print(f"DONE {value.n}", flush=True)
        else:
            value.n += 1
            await state.persist_state()
            print(f"READY {value.n}", flush=True)
            while await anyio.to_thread.run_sync(sys.stdin.readline):
                value.n += 1
                try:
                    await state.persist_state()
                except StateOwnershipLost as exc:
                    print(f"LOST {exc}", flush=True)
                else:
                    print(f"PERSISTED {value.n}", flush=True)
        await state.teardown()
    await backend.aclose()


if __name__ == "__main__":
    db, key, loop, mode, rounds = sys.argv[1:6]
    anyio.run(main, db, key, mode, int(rounds), backend=loop)
