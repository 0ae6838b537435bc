"""Deltas, by hypothesis: any changes, persists, restarts and faults load back as a snapshot would.

Random steps on a big model (nested dicts, lists, sets, models, models in dicts and
lists; items set, added, removed, moved; fields assigned), persists in between,
restarts (the state torn down and loaded again), and write batches that fail
before or after they land. After every step, what the store holds equals the live
value and what a whole snapshot of it loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from recoverable_state import RecoverableState, StorageError
from recoverable_state.storage import CHAIN_CONTENT_TYPE, KeyValueStore, MemoryBackend, open_backend
from recoverable_state.testing import FaultInjectingBackend

PAD = "p" * 70_000


class Leaf(BaseModel):
    n: int = 0
    tags: list[str] = []
    meta: dict[str, int] = {}


class Tree(BaseModel):
    pad: str = PAD
    counts: dict[str, int] = {}
    leaves: dict[str, Leaf] = {}
    log: list[str] = []
    rows: list[Leaf] = []
    ids: set[int] = set()
    one: Leaf = Leaf()
    nested: dict[str, dict[str, list[int]]] = {}


keys = st.sampled_from(["a", "b", "c", "d", "é", "k/1", ""])
small = st.integers(-5, 1000)
words = st.text(max_size=6)


def _change(kind: str, key: str, other: str, n: int, word: str) -> Callable[[Tree], object]:
    """One change to a live value (a no-op where what it needs is absent)."""
    changes: dict[str, Callable[[Tree], object]] = {
        "count": lambda v: v.counts.__setitem__(key, n),
        "uncount": lambda v: v.counts.pop(key, None),
        "counts-update": lambda v: v.counts.update({key: n, other: n + 1}),
        "counts-clear": lambda v: v.counts.clear(),
        "leaf": lambda v: v.leaves.__setitem__(key, Leaf(n=n, tags=[word])),
        "leaf-n": lambda v: key in v.leaves and setattr(v.leaves[key], "n", n),
        "leaf-tag": lambda v: key in v.leaves and v.leaves[key].tags.append(word),
        "leaf-meta": lambda v: key in v.leaves and v.leaves[key].meta.__setitem__(other, n),
        "leaf-move": lambda v: key in v.leaves and v.leaves.__setitem__(other, v.leaves.pop(key)),
        "unleaf": lambda v: v.leaves.pop(key, None),
        "log": lambda v: v.log.append(word),
        "log-extend": lambda v: v.log.extend([word, word]),
        "log-pop": lambda v: v.log and v.log.pop(0),
        "log-set": lambda v: v.log and v.log.__setitem__(n % len(v.log), word),
        "row": lambda v: v.rows.append(Leaf(n=n)),
        "row-n": lambda v: v.rows and setattr(v.rows[n % len(v.rows)], "n", n),
        "row-tag": lambda v: v.rows and v.rows[-1].tags.append(word),
        "row-pop": lambda v: v.rows and v.rows.pop(n % len(v.rows)),
        "id": lambda v: v.ids.add(n),
        "unid": lambda v: v.ids.discard(n),
        "one": lambda v: setattr(v, "one", Leaf(n=n, meta={key: n})),
        "one-n": lambda v: setattr(v.one, "n", n),
        "one-tags": lambda v: v.one.tags.extend([word]),
        "nest": lambda v: v.nested.setdefault(key, {}).setdefault(other, []).append(n),
        "unnest": lambda v: v.nested.pop(key, None),
        "pad": lambda v: setattr(v, "pad", PAD + word),
    }
    return changes[kind]


KINDS = [
    "count", "uncount", "counts-update", "counts-clear", "leaf", "leaf-n", "leaf-tag", "leaf-meta",
    "leaf-move", "unleaf", "log", "log-extend", "log-pop", "log-set", "row", "row-n", "row-tag",
    "row-pop", "id", "unid", "one", "one-n", "one-tags", "nest", "unnest", "pad",
]  # fmt: skip

change = st.tuples(st.sampled_from(KINDS), keys, keys, small, words)
step = st.one_of(  # mostly changes, so that several meet in one persist
    change,
    change,
    change,
    st.sampled_from([("persist",)] * 3 + [("restart",), ("fail-before",), ("fail-after",)]),
)


async def _run(storage: FaultInjectingBackend, steps: list[tuple[Any, ...]]) -> int:
    """Apply `steps`; after each persist, the store holds the value. Returns how many deltas were written."""
    kvs = await KeyValueStore.open(name="props", storage=storage)

    async def factory() -> KeyValueStore:
        return kvs

    def make() -> RecoverableState[Tree]:
        return RecoverableState(
            default_state=Tree,
            persist_state_key="tree",
            persistence_enabled="explicit_only",
            persist_state_kvs_factory=factory,
        )

    state = make()
    value = await state.initialize()
    deltas = 0
    for s in steps:
        if s[0] == "restart":
            await state.teardown()
            state = make()
            value = await state.initialize()
        elif s[0] in ("fail-before", "fail-after"):
            storage.fail_next(on="write", when="before" if s[0] == "fail-before" else "after")
            try:
                await state.persist_state()
            except StorageError:
                pass
            else:  # nothing to write: the fault waits for the next batch; take it away
                storage.faults["write"].clear()
        elif s[0] == "persist":
            await state.persist_state()
        else:
            _change(*s)(value)
            continue
        if s[0] != "fail-before":
            record = await kvs.get_record("tree")
            stored = await kvs.get_record("tree", chain=True)
            assert record is not None
            assert stored is not None
            deltas += stored.content_type == CHAIN_CONTENT_TYPE
            if s[0] != "fail-after":
                loaded = Tree.model_validate_json(record.value)
                assert loaded == value
                assert loaded == Tree.model_validate_json(value.model_dump_json())
    await state.persist_state()
    await state.teardown()
    again = make()
    assert await again.initialize() == value
    await again.teardown()
    return deltas


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize("store", ["memory", "sqlite", "file"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=40))
def test_any_changes_load_back_as_a_snapshot_would(
    loop: str, store: str, steps: list[tuple[Any, ...]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    if store == "memory":
        inner = MemoryBackend()
    else:
        root: Path = tmp_path_factory.mktemp(store)
        inner = open_backend(f"sqlite:///{root}/s.sqlite3" if store == "sqlite" else f"file://{root}/files")

    async def main() -> None:
        storage = FaultInjectingBackend(inner)
        try:
            await _run(storage, steps)
        finally:
            await storage.aclose()

    anyio.run(main, backend=loop)


def test_the_steps_write_deltas() -> None:
    """The property above is about deltas: a typical run writes some (else it tests snapshots only)."""
    steps = [("count", "a", "b", 1, "x"), ("persist",)] * 3 + [("leaf", "a", "b", 2, "y"), ("persist",)]

    async def main() -> int:
        storage = FaultInjectingBackend(MemoryBackend())
        try:
            return await _run(storage, steps)
        finally:
            await storage.aclose()

    assert anyio.run(main) >= 3
