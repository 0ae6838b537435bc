"""A change made anywhere in a state, in place or by assignment, is persisted by the next persist;
an unchanged state is not written again."""

from __future__ import annotations

import copy
import dataclasses
import heapq
import json
import pickle
from collections.abc import Callable
from typing import Any, Literal

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from recoverable_state import KeyValueStore, RecoverableState, service_locator
from recoverable_state.storage import MemoryBackend, SQLiteBackend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        service_locator.set_storage(MemoryBackend())
    else:
        service_locator.set_storage(SQLiteBackend("changes.sqlite3"))
    return str(request.param)


class Page(BaseModel):
    url: str = ""
    status: int = 0
    tags: list[str] = []
    headers: dict[str, str] = {}


class Inner(BaseModel):
    pages: list[Page] = []
    depth: dict[str, list[int]] = {}


class Crawl(BaseModel):
    cursor: int = 0
    name: str = ""
    queue: list[str] = []
    seen: set[str] = set()
    retries: dict[str, int] = {}
    grid: list[list[int]] = []
    recent: list[Page] = []
    inner: Inner = Inner()
    best: Page | None = None
    pair: tuple[int, str] = (0, "")


def loaded() -> Crawl:
    return Crawl(
        cursor=1,
        queue=["a", "b", "c"],
        seen={"x"},
        retries={"a": 1},
        grid=[[1, 2], [3]],
        recent=[Page(url="p0", tags=["t"], headers={"h": "1"}), Page(url="p1")],
        inner=Inner(pages=[Page(url="i0", tags=["deep"])], depth={"a": [1]}),
        best=Page(url="best"),
    )


async def record_of(key: str) -> tuple[Any, int] | None:
    record = await (await KeyValueStore.open()).get_record(key)
    return None if record is None else (json.loads(record.value), record.version)


def plain(value: Any) -> Any:
    """What the stored JSON of `value` parses to."""
    if isinstance(value, BaseModel):
        return json.loads(value.model_dump_json())
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


async def persisted_equal(state: RecoverableState[Any]) -> bool:
    found = await record_of(state.persist_state_key)
    assert found is not None
    return bool(found[0] == plain(state.current_value))


def _new_page_then_change(c: Crawl) -> None:
    c.recent.append(Page(url="new"))


MUTATIONS: dict[str, Callable[[Crawl], None]] = {
    "assign an int": lambda c: setattr(c, "cursor", 99),
    "append to a list": lambda c: c.queue.append("d"),
    "set a list item": lambda c: c.queue.__setitem__(0, "z"),
    "delete a list item": lambda c: c.queue.__delitem__(1),
    "sort a list": lambda c: c.queue.sort(reverse=True),
    "extend a list with +=": lambda c: c.queue.__iadd__(["e"]),
    "replace a slice": lambda c: c.queue.__setitem__(slice(0, 2), ["q"]),
    "pop from a list": lambda c: c.queue.pop(),
    "add to a set": lambda c: c.seen.add("y"),
    "discard from a set": lambda c: c.seen.discard("x"),
    "set a dict item": lambda c: c.retries.__setitem__("b", 2),
    "pop a dict item": lambda c: c.retries.pop("a"),
    "update a dict with |=": lambda c: c.retries.__ior__({"c": 3}),
    "append to a list in a list": lambda c: c.grid[1].append(4),
    "set a field of a model in a list": lambda c: setattr(c.recent[0], "status", 500),
    "append to a list in a model in a list": lambda c: c.recent[0].tags.append("u"),
    "set a dict item in a model in a list": lambda c: c.recent[0].headers.__setitem__("h", "2"),
    "set a field of a nested model": lambda c: setattr(c.inner.pages[0], "status", 404),
    "append to a list two models deep": lambda c: c.inner.pages[0].tags.append("deeper"),
    "append to a list in a dict in a model": lambda c: c.inner.depth["a"].append(2),
    "set a field of an optional model": lambda c: setattr(c.best, "status", 1),  # type: ignore[arg-type]
    "replace a nested model": lambda c: setattr(c, "inner", Inner(depth={"n": [5]})),
    "assign a tuple": lambda c: setattr(c, "pair", (1, "x")),
    "reverse a list of models": lambda c: c.recent.reverse(),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=list(MUTATIONS))
async def test_every_change_in_place_or_by_assignment_is_persisted(store: str, mutation: str) -> None:
    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    await state.persist_state()
    before = await record_of("k")
    MUTATIONS[mutation](value)
    await state.persist_state()
    after = await record_of("k")
    assert before is not None and after is not None
    assert after[1] == before[1] + 1, "the change was not written"
    assert await persisted_equal(state)
    await state.teardown()


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=list(MUTATIONS))
async def test_a_change_to_a_state_loaded_from_the_store_is_persisted(store: str, mutation: str) -> None:
    first = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    await first.initialize()
    await first.teardown()
    state = RecoverableState(default_state=Crawl, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    assert value == loaded()
    MUTATIONS[mutation](value)
    await state.persist_state()
    assert await persisted_equal(state)
    await state.teardown()


_EXPLICIT: Literal["explicit_only"] = "explicit_only"


class OpenPage(BaseModel, extra="allow"):
    url: str = ""


class CheckedPage(BaseModel, validate_assignment=True):
    url: str = ""


@dataclasses.dataclass
class RawPage:
    url: str = ""


class Mixed(BaseModel):
    """Containers holding parts that cannot be watched, after parts that can."""

    grid: list[list[int]] = []
    open_pages: list[OpenPage] = []
    checked: dict[str, CheckedPage] = {}
    nested: list[list[OpenPage]] = []
    raw: list[RawPage] = []


def mixed() -> Mixed:
    return Mixed(
        grid=[[1], [2]],
        open_pages=[OpenPage(url="a", status=200), OpenPage(url="b")],
        checked={"x": CheckedPage(url="x")},
        nested=[[OpenPage(url="n")]],
        raw=[RawPage(url="r")],
    )


@pytest.mark.parametrize("loaded_from", ["default", "store"])
async def test_parts_that_cannot_be_watched_are_kept_whole_and_their_changes_persisted(
    store: str, loaded_from: str
) -> None:
    if loaded_from == "store":
        first = RecoverableState(default_state=mixed, persist_state_key="m", persistence_enabled=_EXPLICIT)
        await first.initialize()
        await first.teardown()
    default = Mixed if loaded_from == "store" else mixed
    state = RecoverableState(default_state=default, persist_state_key="m", persistence_enabled=_EXPLICIT)
    value = await state.initialize()
    assert value == mixed()  # handing the value out emptied no container
    value.open_pages[1].url = "changed"
    value.nested[0].append(OpenPage(url="m"))
    value.raw[0].url = "changed too"
    await state.persist_state()
    assert await persisted_equal(state)
    await state.teardown()
    again = RecoverableState(default_state=Mixed, persist_state_key="m", persistence_enabled=_EXPLICIT)
    assert (await again.initialize()).open_pages[1].url == "changed"
    await again.teardown()


@pytest.mark.parametrize("top", ["list", "dict"])
async def test_a_top_level_container_of_parts_that_cannot_be_watched_is_kept_whole(
    store: str, top: str
) -> None:
    def default() -> Any:
        return [RawPage(url="a"), RawPage(url="b")] if top == "list" else {"a": RawPage(url="a")}

    kind: Any = list[RawPage] if top == "list" else dict[str, RawPage]
    first = RecoverableState[kind](
        default_state=default, persist_state_key="t", persistence_enabled=_EXPLICIT
    )
    assert await first.initialize() == default()
    await first.teardown()
    state = RecoverableState[kind](
        default_state=default, persist_state_key="t", persistence_enabled=_EXPLICIT
    )
    value = await state.initialize()
    assert value == default()
    await state.teardown()


async def test_parts_put_in_after_a_persist_are_watched_too(store: str) -> None:
    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    value.recent.append(Page(url="new", tags=["a"]))
    value.grid.append([7])
    value.inner = Inner(pages=[Page(url="n")], depth={"z": [1]})
    await state.persist_state()
    assert await persisted_equal(state)
    for change in (
        lambda: value.recent[-1].tags.append("b"),
        lambda: setattr(value.recent[-1], "status", 3),
        lambda: value.grid[-1].append(8),
        lambda: setattr(value.inner.pages[0], "url", "m"),
        lambda: value.inner.depth["z"].append(2),
    ):
        change()
        await state.persist_state()
        assert await persisted_equal(state)
    await state.teardown()


async def test_a_list_the_worker_still_holds_is_persisted_when_changed_through_that_reference(
    store: str,
) -> None:
    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    mine: list[str] = ["m"]
    value.queue = mine
    page = Page(url="mine")
    value.recent.append(page)
    await state.persist_state()
    mine.append("n")  # the worker's own reference: the state must still be this very list
    assert value.queue is mine
    await state.persist_state()
    assert await persisted_equal(state)
    page.tags.append("t")
    await state.persist_state()
    assert await persisted_equal(state)
    await state.teardown()


async def test_a_part_shared_by_two_states_is_persisted_in_both(store: str) -> None:
    a = RecoverableState(default_state=loaded, persist_state_key="a", persistence_enabled="explicit_only")
    b = RecoverableState(default_state=loaded, persist_state_key="b", persistence_enabled="explicit_only")
    va, vb = await a.initialize(), await b.initialize()
    vb.recent.append(va.recent[0])  # one Page object in both states
    await RecoverableState.persist_many([a, b])
    va.recent[0].status = 201
    await RecoverableState.persist_many([a, b])
    assert await persisted_equal(a)
    assert await persisted_equal(b)
    await a.teardown()
    await b.teardown()


async def test_an_unchanged_state_is_not_written_again(store: str) -> None:
    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    await state.persist_state()
    before = await record_of("k")
    _ = value.recent[0].tags[0], value.inner.depth["a"], list(value.seen)  # reading changes nothing
    await state.persist_state()
    assert await record_of("k") == before
    value.cursor = value.cursor  # the same value again: written or not, the record is right
    await state.persist_state()
    assert await persisted_equal(state)
    await state.teardown()


async def test_reset_then_change_in_place_is_persisted(store: str) -> None:
    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    value.queue.append("x")
    await state.persist_state()
    await state.reset()
    await state.persist_state()
    assert await persisted_equal(state)
    value.queue.append("after-reset")
    value.recent[0].tags.append("after-reset")
    await state.persist_state()
    assert await persisted_equal(state)
    await state.teardown()


async def test_copies_and_pickles_of_a_state_are_plain_values(store: str) -> None:
    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    for other in (copy.deepcopy(value), pickle.loads(pickle.dumps(value)), value.model_copy(deep=True)):
        assert other == value
        assert type(other.queue) is list and type(other.retries) is dict and type(other.seen) is set
        assert type(other.recent[0].tags) is list
    assert isinstance(value.queue, list) and value.queue == ["a", "b", "c"]
    # A copy moved into the state and changed there is persisted.
    value.recent.append(copy.deepcopy(value.recent[0]))
    await state.persist_state()
    value.recent[-1].tags.append("copy")
    await state.persist_state()
    assert await persisted_equal(state)
    await state.teardown()


@dataclasses.dataclass
class Job:
    name: str = ""
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Board(TypedDict):
    columns: dict[str, list[str]]


@pytest.mark.parametrize("kind", ["dataclass", "typeddict", "json-dict", "list"])
async def test_changes_deep_inside_dataclass_and_typeadapter_states_are_persisted(
    store: str, kind: str
) -> None:
    default: Any
    change: Callable[[Any], None]
    if kind == "dataclass":
        default, state_type = (lambda: Job(name="j", steps=[{"n": [1]}])), Job
        change = lambda v: v.steps[0]["n"].append(2)  # noqa: E731
    elif kind == "typeddict":
        default, state_type = (lambda: Board(columns={"todo": ["a"]})), Board
        change = lambda v: v["columns"]["todo"].append("b")  # noqa: E731
    elif kind == "json-dict":
        default, state_type = {"progress": {"done": [1]}}, None
        change = lambda v: v["progress"]["done"].append(2)  # noqa: E731
    else:
        default, state_type = [[1], {"a": [2]}], None
        change = lambda v: v[1]["a"].append(3)  # noqa: E731
    state: RecoverableState[Any] = RecoverableState(
        default_state=default,
        persist_state_key="k",
        persistence_enabled="explicit_only",
        state_type=state_type,
    )
    value = await state.initialize()
    await state.persist_state()
    for _ in range(2):
        change(value)
        await state.persist_state()
        assert await persisted_equal(state)
    await state.teardown()


@pytest.mark.parametrize("mode", ["track", "compare"])
async def test_changes_on_a_timer_tick_are_persisted_in_either_mode(
    store: str, mode: Literal["track", "compare"]
) -> None:
    from datetime import timedelta

    from recoverable_state import Event, EventManager, EventPersistStateData

    async with EventManager(persist_state_interval=timedelta(hours=1)) as manager:
        states = [
            RecoverableState(
                default_state=loaded,
                persist_state_key=f"k{i}",
                persistence_enabled=True,
                event_manager=manager,
                change_detection=mode,
            )
            for i in range(20)
        ]
        await RecoverableState.initialize_many(states)
        for round_no in range(3):
            for state in states[round_no::3]:
                state.current_value.inner.pages[0].tags.append(f"r{round_no}")
            manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
            await manager.wait_for_all_listeners_to_complete()
            for state in states:
                assert await persisted_equal(state)
        for state in states:
            await state.teardown()


async def test_heapq_changes_are_persisted_with_change_detection_compare(store: str) -> None:
    state = RecoverableState(
        default_state=loaded,
        persist_state_key="k",
        persistence_enabled="explicit_only",
        change_detection="compare",
    )
    value = await state.initialize()
    await state.persist_state()
    heapq.heappush(value.queue, "0")
    await state.persist_state()
    assert await persisted_equal(state)
    await state.teardown()


def test_change_detection_takes_track_or_compare() -> None:
    with pytest.raises(ValueError, match="change_detection"):
        RecoverableState(default_state=Crawl(), persist_state_key="k", change_detection="hash")  # type: ignore[arg-type]


async def test_a_dropped_state_is_freed_by_reference_counting_alone(store: str) -> None:
    import gc
    import weakref

    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    value.queue.append("x")
    await state.persist_state()
    await state.teardown()
    refs = [weakref.ref(state), weakref.ref(value)]
    gc.disable()  # states are frozen out of the collector after a big load: they must hold no cycle
    try:
        del state, value
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


async def test_a_change_behind_the_containers_backs_is_saved_by_persist_state_and_teardown(
    store: str,
) -> None:
    """heapq changes a list without its methods; an explicit persist or teardown still finds it."""
    state = RecoverableState(default_state=loaded, persist_state_key="k", persistence_enabled="explicit_only")
    value = await state.initialize()
    await state.persist_state()
    heapq.heappush(value.queue, "0")
    await state.persist_state()
    assert await persisted_equal(state)
    heapq.heappush(value.queue, "00")
    await state.teardown()
    stored = await (await KeyValueStore.open()).get_value("k")
    assert "00" in stored["queue"]


async def test_a_change_behind_the_containers_backs_is_saved_within_ten_timer_ticks(store: str) -> None:
    from recoverable_state import Event, EventManager, EventPersistStateData

    manager = EventManager()
    async with manager:
        state = RecoverableState(
            default_state=loaded, persist_state_key="k", persistence_enabled=True, event_manager=manager
        )
        value = await state.initialize()

        async def tick() -> None:
            manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
            await manager.wait_for_all_listeners_to_complete()

        await tick()  # the value is watched from here on
        await tick()
        heapq.heappush(value.queue, "0")
        for _ in range(10):
            manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
            await manager.wait_for_all_listeners_to_complete()
        assert await persisted_equal(state)
        await state.teardown()
