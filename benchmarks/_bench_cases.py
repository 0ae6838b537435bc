"""The measured cases of the persist benchmark: one repetition of the library or of its baseline.

Each function sets up its own data on a fresh place, times only the section
being compared, checks that the work really happened, and cleans up. Times are
in seconds; the caller takes medians and ratios.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import os
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from _bench_stores import Place, Store
from _worker_model import (  # noqa: F401  (re-exported: the other modules import them from here)
    BIG_PAGES,
    SMALL_PAGES,
    Page,
    WorkerState,
    changed_indexes,
    dump,
    key_of,
    load,
    make_model,
    mutate,
    payloads,
)

from recoverable_state import (
    Event,
    EventManager,
    EventPersistStateData,
    KeyValueStore,
    RecoverableState,
    service_locator,
)
from recoverable_state.storage import JSON_CONTENT_TYPE

NEVER = timedelta(hours=24)
"""The timer interval of every manager here: only the benchmark emits PERSIST_STATE."""

CLOSE_TIMEOUT = timedelta(minutes=10)


@contextlib.contextmanager
def stopwatch(out: list[float], *, sync_disk: bool = False, profile: Path | None = None) -> Iterator[None]:
    """Append the seconds the block takes to `out`; dirty pages synced and garbage collected first."""
    if sync_disk:
        os.sync()  # writes left over from the setup must not land in the timed section
    gc.collect()
    profiler = cProfile.Profile() if profile is not None else None
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    try:
        yield
    finally:
        out.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)


def _skip_fsync(fd: int) -> None:
    return None


@contextlib.contextmanager
def setup_without_fsync() -> Iterator[None]:
    """Let setup writes (never timed) skip fsync: a file store's setup would otherwise take minutes.

    Every timed section starts with `os.sync()`, so the data is on disk by then.
    SQLite, Redis and PostgreSQL sync in C or on the server and are not affected.
    """
    real = os.fsync
    os.fsync = _skip_fsync
    try:
        yield
    finally:
        os.fsync = real


async def emit_persist(manager: EventManager) -> None:
    """One PERSIST_STATE, returning once every listener is done (every write durable)."""
    manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
    await manager.wait_for_all_listeners_to_complete()


def make_states(
    n: int, place: Place, manager: EventManager, default: WorkerState
) -> list[RecoverableState[WorkerState]]:
    return [
        RecoverableState(
            default_state=default,
            persist_state_key=key_of(i),
            persistence_enabled=True,
            persist_state_kvs_name=place.kvs_name,
            event_manager=manager,
        )
        for i in range(n)
    ]


async def teardown_all(states: Sequence[RecoverableState[Any]]) -> None:
    for state in states:
        await state.teardown()


async def check_stored(store: Store, place: Place, backend: Any, key: str, model: WorkerState) -> None:
    """Fail unless `key` holds exactly `model` (so a benchmark never times work not done)."""
    kvs = await KeyValueStore.open(name=place.kvs_name, storage=backend)
    record = await kvs.get_record(key)
    if record is None or record.value != dump(model):
        raise AssertionError(f"{store.name}: record {key!r} does not hold the last persisted model")


@contextlib.asynccontextmanager
async def library_on(store: Store, place: Place) -> Any:
    """A fresh backend on `place`, installed as the default storage, closed afterwards."""
    backend = store.backend(place)
    service_locator.reset()
    service_locator.set_storage(backend)
    try:
        yield backend
    finally:
        try:
            await backend.aclose()
        finally:
            service_locator.reset()


async def populate_library(store: Store, place: Place, n: int, big: bool) -> None:
    """Store the records of `n` states through the library, then close the backend."""
    with setup_without_fsync():
        async with library_on(store, place) as backend:
            kvs = await KeyValueStore.open(name=place.kvs_name, storage=backend)
            puts = [
                (kvs, kvs.prepare_put(key_of(i), data, JSON_CONTENT_TYPE))
                for i, data in enumerate(payloads(n, big))
            ]
            await KeyValueStore.put_together(puts)


# -- persist ------------------------------------------------------------------


async def library_persist(
    store: Store,
    n: int,
    *,
    big: bool,
    fractions: Sequence[float],
    profile: Sequence[Path | None] = (),
) -> list[float]:
    """Seconds per PERSIST_STATE with each fraction of the states changed, in order.

    The states are loaded from stored records first (as after a restart), so
    that the timed persists replace records as those of a running worker do.
    """
    place = store.new_place()
    times: list[float] = []
    try:
        await populate_library(store, place, n, big)
        async with (
            library_on(store, place) as backend,
            EventManager(persist_state_interval=NEVER, close_timeout=CLOSE_TIMEOUT) as manager,
        ):
            states = make_states(n, place, manager, WorkerState(worker_id=-1))
            try:
                with setup_without_fsync():  # loading claims (rewrites) every record
                    await RecoverableState.initialize_many(states)
                for round_no, fraction in enumerate(fractions, 1):
                    indexes = changed_indexes(n, fraction)
                    for i in indexes:
                        mutate(states[i].current_value, round_no)
                    prof = profile[round_no - 1] if len(profile) >= round_no else None
                    with stopwatch(times, sync_disk=store.durable_on_disk, profile=prof):
                        await emit_persist(manager)
                    last = indexes[-1]
                    await check_stored(store, place, backend, key_of(last), states[last].current_value)
            finally:
                await teardown_all(states)
    finally:
        await store.drop(place)
    return times


async def raw_persist(store: Store, n: int, *, big: bool, fractions: Sequence[float]) -> list[float]:
    """The baseline of `library_persist`: serialise the changed models, write them in one batch."""
    place = store.new_place()
    raw = store.raw(place)
    times: list[float] = []
    try:
        models = [load(data) for data in payloads(n, big)]
        keys = [key_of(i) for i in range(n)]
        await raw.write([(keys[i], dump(models[i])) for i in range(n)], durable=False)
        for round_no, fraction in enumerate(fractions, 1):
            indexes = changed_indexes(n, fraction)
            for i in indexes:
                mutate(models[i], round_no)
            with stopwatch(times, sync_disk=store.durable_on_disk):
                await raw.write([(keys[i], dump(models[i])) for i in indexes])
    finally:
        try:
            await raw.close()
        finally:
            await store.drop(place)
    return times


# -- initialize ---------------------------------------------------------------


async def library_initialize(store: Store, n: int, *, big: bool, profile: Path | None = None) -> float:
    """Seconds for `initialize_many` over `n` stored states, on a backend opened afresh."""
    place = store.new_place()
    times: list[float] = []
    try:
        await populate_library(store, place, n, big)
        async with (
            library_on(store, place),
            EventManager(persist_state_interval=NEVER, close_timeout=CLOSE_TIMEOUT) as manager,
        ):
            states = make_states(n, place, manager, WorkerState(worker_id=-1))
            try:
                with stopwatch(times, sync_disk=store.durable_on_disk, profile=profile):
                    await RecoverableState.initialize_many(states)
                if states[-1].current_value != load(payloads(n, big)[-1]):
                    raise AssertionError(f"{store.name}: the last state did not load its stored model")
            finally:
                await teardown_all(states)
    finally:
        await store.drop(place)
    return times[0]


async def raw_initialize(store: Store, n: int, *, big: bool) -> float:
    """The baseline of `library_initialize`: read all records, validate each."""
    place = store.new_place()
    times: list[float] = []
    keys = [key_of(i) for i in range(n)]
    try:
        writer = store.raw(place)
        try:
            await writer.write(list(zip(keys, payloads(n, big), strict=True)), durable=False)
        finally:
            await writer.close()
        reader = store.raw(place)
        try:
            with stopwatch(times, sync_disk=store.durable_on_disk):
                data = await reader.read_all(keys)
                models = [WorkerState.model_validate_json(d) for d in data]
        finally:
            await reader.close()
        if models[-1] != load(payloads(n, big)[-1]):
            raise AssertionError(f"{store.name}: the raw read did not return the stored model")
    finally:
        await store.drop(place)
    return times[0]


# -- emit overhead ------------------------------------------------------------


def _noop_listener() -> Any:
    # A new function object per call: the manager ignores a listener registered twice.
    async def listener(event_data: object) -> None:
        return None

    return listener


async def library_emit(n: int, *, profile: Path | None = None) -> float:
    """Seconds for one PERSIST_STATE to reach `n` no-op listeners and for all to finish."""
    times: list[float] = []
    service_locator.reset()
    try:
        async with EventManager(persist_state_interval=NEVER, close_timeout=CLOSE_TIMEOUT) as manager:
            for listener in [_noop_listener() for _ in range(n)]:
                manager.on(event=Event.PERSIST_STATE, listener=listener)
            with stopwatch(times, profile=profile):
                await emit_persist(manager)
            manager.off(event=Event.PERSIST_STATE)
    finally:
        service_locator.reset()
    return times[0]


async def _noop() -> None:
    return None


async def raw_spawn(n: int) -> float:
    """The baseline of `library_emit`: `n` no-op tasks in an anyio task group."""
    times: list[float] = []
    with stopwatch(times):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(_noop)
    return times[0]


# -- memory -------------------------------------------------------------------


async def memory_per_state(store: Store, n: int) -> tuple[float, float, float]:
    """(bytes per initialized state beyond its model, bytes per model, the first once the value
    was handed out and is watched for changes), by tracemalloc.

    First the `n` models alone are validated from the stored bytes; then `n`
    states are initialized from the same records. The difference, per state, is
    what a RecoverableState costs on top of the model it holds.
    """
    place = store.new_place()
    try:
        await populate_library(store, place, n, False)
        async with (
            library_on(store, place) as backend,
            EventManager(persist_state_interval=NEVER, close_timeout=CLOSE_TIMEOUT) as manager,
        ):
            kvs = await KeyValueStore.open(name=place.kvs_name, storage=backend)
            records = await KeyValueStore.get_together([(kvs, key_of(i), False) for i in range(n)])
            data = [r.value for r in records if r is not None]
            del records
            default = WorkerState(worker_id=-1)
            tracemalloc.start()
            try:
                gc.collect()
                base = tracemalloc.get_traced_memory()[0]
                models = [WorkerState.model_validate_json(d) for d in data]
                gc.collect()
                models_only = tracemalloc.get_traced_memory()[0] - base
                del models
                gc.collect()
                base = tracemalloc.get_traced_memory()[0]
                states = make_states(n, place, manager, default)
                await RecoverableState.initialize_many(states)
                for _ in range(3):  # the read batch's result is freed once the loop runs its callbacks
                    await anyio.lowlevel.checkpoint()
                gc.collect()
                with_states = tracemalloc.get_traced_memory()[0] - base
                for state in states:  # handed to the worker: now watched for changes
                    state.current_value  # noqa: B018
                gc.collect()
                handed_out = tracemalloc.get_traced_memory()[0] - base
            finally:
                tracemalloc.stop()
            await teardown_all(states)
    finally:
        await store.drop(place)
    return (with_states - models_only) / n, models_only / n, (handed_out - models_only) / n


# -- heartbeat ----------------------------------------------------------------


class Heartbeat:
    """A task that sleeps 1 ms at a time and records the longest it waited beyond that."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.beats = 0

    async def run(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            await anyio.sleep(0.001)
            self.longest = max(self.longest, time.perf_counter() - start - 0.001)
            self.beats += 1


async def library_heartbeat(store: Store, n: int) -> tuple[float, float]:
    """(longest heartbeat wait, seconds of the persist) while `n` changed states persist at once."""
    place = store.new_place()
    times: list[float] = []
    beat = Heartbeat()
    try:
        await populate_library(store, place, n, False)
        async with (
            library_on(store, place) as backend,
            EventManager(persist_state_interval=NEVER, close_timeout=CLOSE_TIMEOUT) as manager,
        ):
            states = make_states(n, place, manager, WorkerState(worker_id=-1))
            try:
                with setup_without_fsync():
                    await RecoverableState.initialize_many(states)
                for state in states:
                    mutate(state.current_value, 1)
                if store.durable_on_disk:
                    os.sync()
                gc.collect()
                stop = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(beat.run, stop)
                    await anyio.sleep(0.01)
                    beat.longest = 0.0
                    start = time.perf_counter()
                    await emit_persist(manager)
                    times.append(time.perf_counter() - start)
                    stop.set()
                await check_stored(store, place, backend, key_of(n - 1), states[-1].current_value)
            finally:
                await teardown_all(states)
    finally:
        await store.drop(place)
    return beat.longest, times[0]


async def idle_heartbeat(seconds: float) -> float:
    """The baseline: the longest heartbeat wait on a loop doing nothing else for `seconds`."""
    beat = Heartbeat()
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(beat.run, stop)
        await anyio.sleep(max(seconds, 0.05))
        stop.set()
    return beat.longest
