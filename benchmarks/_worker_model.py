"""The data every persist benchmark uses: one worker's state, about 600 B of JSON.

Imports pydantic only, so that a baseline's process holds nothing of the
library: a raw or diskcache child imports this and its own driver, no more.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel

SMALL_PAGES = 3  # about 600 bytes of JSON
BIG_PAGES = 615  # about 50 KB of JSON


class Page(BaseModel):
    """A page a worker saw recently."""

    url: str
    status: int
    depth: int


class WorkerState(BaseModel):
    """The state of one worker, as a crawler might keep it."""

    worker_id: int
    cursor: int = 0
    processed: int = 0
    failed: int = 0
    last_url: str = ""
    started_at: str = ""
    tags: list[str] = []
    retries: dict[str, int] = {}
    recent: list[Page] = []


_serializer = WorkerState.__pydantic_serializer__


def make_model(i: int, big: bool = False) -> WorkerState:
    """The model of state `i`; the same content for the library and its baseline."""
    # One validation of plain data: much faster than building each Page on its own.
    return WorkerState.model_validate(
        {
            "worker_id": i,
            "cursor": i * 7,
            "processed": i * 3,
            "failed": i % 5,
            "last_url": f"https://example.com/catalogue/item/{i}?page={i % 40}",
            "started_at": "2025-01-01T00:00:00+00:00",
            "tags": ["crawler", "eu-west", "priority-normal", f"shard-{i % 16}"],
            "retries": {f"https://example.com/item/{i + k}": k for k in range(3)},
            "recent": [
                {"url": f"https://example.com/catalogue/item/{i}/page/{k}", "status": 200, "depth": k % 4}
                for k in range(BIG_PAGES if big else SMALL_PAGES)
            ],
        }
    )


@functools.lru_cache(maxsize=4)
def payloads(n: int, big: bool = False) -> tuple[bytes, ...]:
    """The stored bytes of states 0..n-1, built once per run (setup, never timed)."""
    return tuple(dump(make_model(i, big)) for i in range(n))


def load(data: bytes) -> WorkerState:
    return WorkerState.model_validate_json(data)


def dump(model: WorkerState) -> bytes:
    """The bytes the library stores for `model`."""
    return _serializer.to_json(model, by_alias=True)


def key_of(i: int) -> str:
    return f"state-{i:06d}"


def changed_indexes(n: int, fraction: float) -> range:
    """Which states change: all of them, or one in every 1/fraction."""
    return range(0, n, max(1, round(1 / fraction)))


def mutate(model: WorkerState, round_no: int) -> None:
    model.processed += 1
    model.cursor = round_no * 1_000_003 + model.worker_id
