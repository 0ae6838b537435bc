"""Property: any model with random field types and values persists and loads back equal,
or is refused with a library error and the stored record untouched."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, create_model

from recoverable_state import KeyValueStore, RecoverableState, UnrepresentableStateError, service_locator
from recoverable_state.storage import MemoryBackend, SQLiteBackend

pytestmark = pytest.mark.anyio

json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text()
KINDS: dict[str, tuple[Any, Any, st.SearchStrategy[Any]]] = {
    "int": (int, 0, st.integers(-(2**63), 2**63 - 1)),
    "float": (float, 0.0, st.floats()),
    "str": (str, "", st.text()),
    "bytes": (bytes, b"", st.binary(max_size=20)),
    "floats": (list[float], [], st.lists(st.floats(), max_size=4)),
    "nested": (
        dict[str, list[int]],
        {},
        st.dictionaries(st.text(max_size=5), st.lists(st.integers(), max_size=3)),
    ),
    "any": (
        Any,
        None,
        st.recursive(
            json_leaf,
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
            max_leaves=20,
        ),
    ),
    "deep": (Any, None, st.integers(150, 300).map(lambda d: _nest(d))),
}


def _nest(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def models(draw: st.DrawFn) -> tuple[type[BaseModel], dict[str, Any]]:
    kinds = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=4))
    fields = {f"f{i}_{k}": (KINDS[k][0], KINDS[k][1]) for i, k in enumerate(kinds)}
    values = {f"f{i}_{k}": draw(KINDS[k][2]) for i, k in enumerate(kinds)}
    return create_model("Random", **fields), values  # type: ignore[call-overload]


_keys = itertools.count()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest) -> str:
    backend = MemoryBackend() if request.param == "memory" else SQLiteBackend("props.sqlite3")
    service_locator.set_storage(backend)
    return str(request.param)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=models())
async def test_a_random_model_loads_back_equal_or_is_refused_untouched(
    store: str, drawn: tuple[type[BaseModel], dict[str, Any]]
) -> None:
    model, values = drawn
    key = f"k{next(_keys)}"
    kvs = await KeyValueStore.open()
    state = RecoverableState(
        default_state=model(), persist_state_key=key, persistence_enabled="explicit_only"
    )
    value = await state.initialize()
    await state.persist_state()
    before = await kvs.get_record(key)
    for name, v in values.items():
        setattr(value, name, v)
    refused: UnrepresentableStateError | None = None
    try:
        await state.persist_state()
    except UnrepresentableStateError as exc:
        refused = exc
    if refused is not None:
        assert (refused.key, bool(refused.field)) == (key, True)
        assert await kvs.get_record(key) == before
        for name in values:
            setattr(value, name, model.model_fields[name].default)
        await state.teardown()
        return
    await state.teardown()
    again = RecoverableState(
        default_state=model(), persist_state_key=key, persistence_enabled="explicit_only"
    )
    assert await again.initialize() == value
    await again.teardown()
