"""A worker whose one big state is kept as deltas: each tick adds a key and a line, persists, reports.

Usage: delta_worker.py STORAGE_URL asyncio|trio. Prints `TICK n` once the persist
of tick n has returned (the store then holds n ticks, or more).
"""

from __future__ import annotations

import sys

import anyio
from pydantic import BaseModel

from recoverable_state import RecoverableState
from recoverable_state.storage import KeyValueStore, open_backend


class Ticks(BaseModel):
    pad: str = "p" * 70_000  # big enough to be followed by deltas
    n: int = 0
    seen: dict[str, int] = {}
    lines: list[str] = []


def whole(value: Ticks) -> bool:
    """Whether a value holds its ticks and nothing torn: keys, lines and count agree."""
    ticks = range(value.n)
    return value.seen == {f"t{i}": i for i in ticks} and value.lines == [f"l{i}" for i in ticks]


async def main(url: str) -> None:
    storage = open_backend(url)
    kvs = await KeyValueStore.open(name="ticks", storage=storage)

    async def factory() -> KeyValueStore:
        return kvs

    state = RecoverableState(
        default_state=Ticks,
        persist_state_key="ticks",
        persistence_enabled="explicit_only",
        persist_state_kvs_factory=factory,
    )
    value = await state.initialize()
    assert whole(value), "the worker started from a torn value"
    print(f"START {value.n}", flush=True)
    while True:
        value.seen[f"t{value.n}"] = value.n
        value.lines.append(f"l{value.n}")
        value.n += 1
        await state.persist_state()
        print(f"TICK {value.n}", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], backend=sys.argv[2])
