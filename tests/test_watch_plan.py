"""A state loaded from its record is watched by its schema's plan: every change is still seen.

After a cold start the value comes straight from validation, and its mutable
parts are put under watch by a plan read from the model's schema instead of a
walk. Each kind of change, on each kind of field, must reach the store at the
next timer tick (which writes only the states whose change was seen), on
asyncio and trio; a model the plan cannot read takes the walk and is watched
just the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, Field

from recoverable_state import Event, EventManager, EventPersistStateData, KeyValueStore, RecoverableState
from recoverable_state.storage import MemoryBackend

pytestmark = pytest.mark.anyio


class Page(BaseModel):
    url: str = ""
    status: int = 0


class Inner(BaseModel):
    names: list[str] = Field(default_factory=list)


class Crawl(BaseModel):
    count: int = 0
    tags: list[str] = Field(default_factory=list)
    seen: dict[str, int] = Field(default_factory=dict)
    ids: set[int] = Field(default_factory=set)
    pages: list[Page] = Field(default_factory=list)
    by_host: dict[str, Page] = Field(default_factory=dict)
    inner: Inner = Field(default_factory=Inner)
    maybe: list[str] | None = None
    anything: Any = None  # no plan for this model: it takes the walk


class Planned(BaseModel):
    count: int = 0
    tags: list[str] = Field(default_factory=list)
    seen: dict[str, int] = Field(default_factory=dict)
    ids: set[int] = Field(default_factory=set)
    pages: list[Page] = Field(default_factory=list)
    by_host: dict[str, Page] = Field(default_factory=dict)
    inner: Inner = Field(default_factory=Inner)
    maybe: list[str] | None = None


STORED = {
    "count": 1,
    "tags": ["a"],
    "seen": {"x": 1},
    "ids": [1],
    "pages": [{"url": "u", "status": 200}],
    "by_host": {"h": {"url": "v", "status": 301}},
    "inner": {"names": ["n"]},
    "maybe": ["m"],
}

CHANGES: dict[str, Callable[[Any], None]] = {
    "field": lambda v: setattr(v, "count", 2),
    "list append": lambda v: v.tags.append("b"),
    "list item": lambda v: v.tags.__setitem__(0, "z"),
    "dict item": lambda v: v.seen.__setitem__("y", 2),
    "dict delete": lambda v: v.seen.pop("x"),
    "set add": lambda v: v.ids.add(5),
    "model in a list": lambda v: setattr(v.pages[0], "status", 404),
    "list of models grows": lambda v: v.pages.append(Page(url="w")),
    "model in a dict": lambda v: setattr(v.by_host["h"], "url", "moved"),
    "nested model's list": lambda v: v.inner.names.append("o"),
    "optional list": lambda v: v.maybe.append("n"),
    "new list then its change": lambda v: (setattr(v, "tags", ["fresh"]), v.tags.append("later")),
}


@pytest.mark.parametrize("model", [Planned, Crawl], ids=["planned", "walked"])
@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_every_change_to_a_loaded_state_is_seen(change: str, model: type[BaseModel]) -> None:
    kvs = await KeyValueStore.open(storage=MemoryBackend())
    await kvs.set_value("c", STORED)

    async def the_store() -> KeyValueStore:
        return kvs

    async with EventManager(persist_state_interval=3600) as manager:
        await manager.wait_for_all_listeners_to_complete()  # the first tick is done
        state = RecoverableState(
            default_state=model(),
            persist_state_key="c",
            persistence_enabled=True,
            persist_state_kvs_factory=the_store,
            event_manager=manager,
        )
        value = await state.initialize()
        CHANGES[change](value)
        manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData())  # a tick: no full look
        await manager.wait_for_all_listeners_to_complete()
        stored = await kvs.get_value("c")
        assert model.model_validate(stored) == value, change
        manager.off(event=Event.PERSIST_STATE)
