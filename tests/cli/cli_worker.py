"""A small worker that fills a store the way real workers do, for the CLI tests.

python worker.py URL fill   several states with history=3, persisted a few
                            times, plus a text, a bytes and an odd JSON record
python worker.py URL hold   one state "held" with history=3, persisted twice
                            (versions 1 and 2); prints "ready", waits for a
                            line on stdin, changes and persists it, and prints
                            what happened ("persisted" or "ownership lost")
"""

from __future__ import annotations

import sys
from datetime import timedelta

import anyio
from pydantic import BaseModel

from recoverable_state import (
    Configuration,
    EventManager,
    KeyValueStore,
    RecoverableState,
    StateOwnershipLost,
    service_locator,
)
from recoverable_state.storage import JSON_CONTENT_TYPE


class Progress(BaseModel):
    done: int = 0
    label: str = "start"
    seen: list[str] = []


STATES = ["crawler", "queue/consumer 1", "état-ünïcode@x"]
"""The state keys `fill` writes in the default store (each persisted 5 times)."""

ODD_JSON = b'{ "b" : 1.50,\n  "a": [1, 2, "\\u00e9"] }'
"""JSON whose bytes are not the compact form: it must survive export/import as it is."""


async def fill() -> None:
    states = [
        RecoverableState(default_state=Progress(), persist_state_key=key, persistence_enabled=True, history=3)
        for key in STATES
    ]
    other = RecoverableState(
        default_state=Progress(),
        persist_state_key="crawler",
        persistence_enabled=True,
        persist_state_kvs_name="other",
        history=3,
    )
    for state in [*states, other]:
        await state.initialize()
    for step in range(1, 6):
        for state in [*states, other]:
            value = state.current_value
            value.done = step
            value.label = f"step {step} ✓"
            value.seen.append(f"item-{step}")
            await state.persist_state()
    for state in [*states, other]:
        await state.teardown()
    kvs = await KeyValueStore.open()
    await kvs.set_value("notes", "line one\nline two — ünïcode\n")
    await kvs.set_value("blob", bytes(range(256)) + b"\xff\xfe")
    await kvs.put_record("odd-json", ODD_JSON, JSON_CONTENT_TYPE)


async def hold() -> None:
    state = RecoverableState(
        default_state=Progress(), persist_state_key="held", persistence_enabled=True, history=3
    )
    value = await state.initialize()
    for done in (1, 2):
        value.done = done
        await state.persist_state()
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    value.done = 3
    try:
        await state.persist_state()
    except StateOwnershipLost:
        print("ownership lost", flush=True)
    else:
        print("persisted", flush=True)


async def main(url: str, mode: str) -> None:
    service_locator.set_configuration(Configuration(storage_url=url))
    async with EventManager(persist_state_interval=timedelta(hours=1)) as events:
        service_locator.set_event_manager(events)
        await (fill() if mode == "fill" else hold())
    await service_locator.get_storage().aclose()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
