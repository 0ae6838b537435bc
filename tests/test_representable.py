"""One rule for every value: what persist writes, initialize reads back equal, or persist refuses.

Equal means the same value and the same types all the way down (a tuple is not a
list, bytes are not text), NaN equal to itself. Checked by hypothesis over
values of `Any` places and of typed fields, on asyncio and trio. Also: a value
made only of what JSON holds as it is is never refused, and a value another
thread keeps changing is never refused for the change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import math
import threading
import uuid
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from recoverable_state import KeyValueStore, RecoverableState, UnrepresentableStateError
from recoverable_state.storage import MemoryBackend

BACKENDS = ["asyncio", "trio"]

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.datetimes(timezones=st.none() | st.just(dt.UTC))
    | st.dates()
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
    | st.uuids()
)
hashable = st.integers(min_value=-100, max_value=100) | st.text(max_size=4)
anything = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        | st.frozensets(hashable, max_size=4)
        | st.sets(hashable, max_size=4)
    ),
    max_leaves=12,
)
json_native = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**62), max_value=2**62)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def kind(value: Any) -> type:
    """The type of a value, a watched container counted as the container it is (TrackedDict: dict)."""
    for container in (dict, list, set):
        if isinstance(value, container) and type(value).__name__.startswith("Tracked"):
            return container
    return type(value)


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down; NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if kind(a) is not kind(b):
        return False
    if isinstance(a, BaseModel):
        return same(a.__dict__, b.__dict__)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class AnyField(BaseModel):
    x: Any = None


class Typed(BaseModel):
    pair: tuple[int, ...] | list[int] = ()
    ratio: float = 0.0
    tags: set[str] = Field(default_factory=set)
    blob: bytes = b""
    at: dt.datetime | None = None
    amount: decimal.Decimal = decimal.Decimal(0)
    id: uuid.UUID | None = None


def round_trip(backend: str, default: Any, change: Any) -> tuple[bool, Any, Any]:
    """Persist `default` changed by `change`; (refused, what was meant, what a fresh state loads)."""
    state_type = type(default) if isinstance(default, BaseModel) else dict[str, Any]

    async def main() -> tuple[bool, Any, Any]:
        store = await KeyValueStore.open(storage=MemoryBackend())

        async def the_store() -> KeyValueStore:
            return store

        def make() -> RecoverableState[Any]:
            return RecoverableState(
                default_state=default,
                persist_state_key="v",
                persistence_enabled="explicit_only",
                persist_state_kvs_factory=the_store,
                state_type=state_type,
            )

        state = make()
        meant = change(await state.initialize())
        try:
            await state.persist_state()
            refused = False
        except UnrepresentableStateError:
            refused = True
        with contextlib.suppress(UnrepresentableStateError):
            await state.teardown()
        if refused:
            assert not await store.record_exists("v")  # nothing was written
            return True, meant, None
        return False, meant, await make().initialize()

    return anyio.run(main, backend=backend)


def set_x(value: Any, x: Any) -> Any:
    if isinstance(value, dict):
        value["x"] = x
        return {"x": x}
    value.x = x
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=anything)
def test_an_any_value_loads_back_the_same_or_is_refused(backend: str, x: Any) -> None:
    for default in ({}, AnyField()):
        refused, meant, loaded = round_trip(backend, default, lambda v: set_x(v, x))
        if not refused:
            got = loaded if isinstance(loaded, dict) else loaded.x
            assert same(got, meant), (meant, got)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, deadline=None)
@given(x=json_native)
def test_a_value_json_holds_as_it_is_is_never_refused(backend: str, x: Any) -> None:
    for default in ({}, AnyField()):
        refused, meant, loaded = round_trip(backend, default, lambda v: set_x(v, x))
        assert not refused
        got = loaded if isinstance(loaded, dict) else loaded.x
        assert same(got, meant)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, deadline=None)
@given(
    pair=st.tuples(st.integers(0, 9), st.integers(0, 9)) | st.lists(st.integers(0, 9), max_size=3),
    ratio=st.integers(-5, 5) | st.floats(allow_nan=True, allow_infinity=False),
    tags=st.sets(st.text(max_size=3), max_size=3),
    blob=st.binary(max_size=6),
)
def test_typed_fields_assigned_without_validation_load_back_the_same_or_are_refused(
    backend: str, pair: Any, ratio: Any, tags: set[str], blob: bytes
) -> None:
    def change(value: Typed) -> Typed:
        value.pair, value.ratio, value.tags, value.blob = pair, ratio, tags, blob
        return value.model_copy()

    refused, meant, loaded = round_trip(backend, Typed(), change)
    if not refused:
        assert same(loaded.pair, meant.pair) and same(loaded.tags, meant.tags) and loaded.blob == meant.blob
        assert loaded.ratio == meant.ratio or (math.isnan(loaded.ratio) and math.isnan(meant.ratio))


def test_a_tuple_in_an_any_place_is_refused_naming_the_field() -> None:
    refused, _, _ = round_trip("asyncio", AnyField(), lambda v: set_x(v, (1, 2)))
    assert refused


class Seen(BaseModel):
    seen: dict[str, int] = Field(default_factory=dict)
    total: int = Field(default=0, ge=0)  # a constraint: every persist gets the full round-trip check


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_value_another_thread_keeps_changing_is_never_refused(backend: str) -> None:
    stop = threading.Event()

    async def main() -> int:
        store = await KeyValueStore.open(storage=MemoryBackend())

        async def the_store() -> KeyValueStore:
            return store

        state = RecoverableState(
            default_state=Seen(),
            persist_state_key="seen",
            persistence_enabled="explicit_only",
            persist_state_kvs_factory=the_store,
        )
        value = await state.initialize()
        for i in range(20_000):
            value.seen[f"u{i}"] = i

        def worker() -> None:  # a sync worker changing the state without editing()
            n = 0
            while not stop.is_set():
                n += 1
                value.seen[f"u{n % 20_000}"] = 100_000 + n
                value.total = n

        thread = threading.Thread(target=worker)
        thread.start()
        refusals = 0
        try:
            for _ in range(15):
                try:
                    await state.persist_state()
                except UnrepresentableStateError:
                    refusals += 1
                await anyio.sleep(0.01)
        finally:
            stop.set()
            thread.join()
        record = await store.get_record("seen")
        assert record is not None and record.version >= 1
        return refusals

    assert anyio.run(main, backend=backend) == 0
