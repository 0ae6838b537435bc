"""Auto-saved plain JSON values: `use_state(key, default)` and `KeyValueStore.get_auto_saved_value`.

For a worker without a model: a dict (or list) loaded once, the same object
handed out on every call, and saved like any RecoverableState (on every
PERSIST_STATE and on leaving the event manager, batched and fenced).
"""

from __future__ import annotations

import weakref
from typing import Any

import anyio

from ._locator import service_locator
from ._state import RecoverableState
from .events import EventManager
from .storage import KeyValueStore, StorageBackend, use_auto_saved_values

JsonValue = dict[str, Any] | list[Any]

# The live value of each (storage, store id, key). A value stays alive while its state
# listens for PERSIST_STATE; the entry goes with it.
_values: weakref.WeakValueDictionary[tuple[StorageBackend, str, str], RecoverableState[Any]] = (
    weakref.WeakValueDictionary()
)
_loading: dict[tuple[StorageBackend, str, str], anyio.Lock] = {}
# The event manager each value was loaded under (the one that saves it).
_saved_by: weakref.WeakKeyDictionary[RecoverableState[Any], EventManager] = weakref.WeakKeyDictionary()


async def auto_saved_value(kvs: KeyValueStore, key: str, default: JsonValue | None = None) -> Any:
    """The auto-saved value under `key` in `kvs`: loaded on first use, then the same object.

    `default` (a dict or list, `{}` when left out) is deep-copied when nothing is
    stored. Change the returned object in place; it is saved on every PERSIST_STATE
    of the service locator's event manager and when that manager is left.
    """
    if default is None:
        default = {}
    if not isinstance(default, dict | list):
        raise TypeError(
            f"store {kvs.label!r}, key {key!r}: an auto-saved value is a dict or a list "
            f"(plain JSON), not {type(default).__name__}; use RecoverableState for other types"
        )
    ident = (kvs.storage, kvs.id, key)
    manager = service_locator.get_event_manager()
    state = _values.get(ident)
    if state is not None and _saved_by.get(state) is not manager:
        # Loaded under an earlier run's manager, which no longer saves it: hand it over.
        del _values[ident]
        await state.teardown()
        state = None
    if state is None:
        lock = _loading.setdefault(ident, anyio.Lock())
        try:
            async with lock:  # two first calls at once load it once
                state = _values.get(ident)
                if state is None:
                    state = RecoverableState(
                        default_state=default,
                        persist_state_key=key,
                        persistence_enabled=True,
                        persist_state_kvs_factory=_the_store(kvs),
                        state_type=dict[str, Any] if isinstance(default, dict) else list[Any],
                    )
                    await state.initialize()
                    _values[ident] = state
                    _saved_by[state] = manager
        finally:
            if not lock.locked():
                _loading.pop(ident, None)
    return state.current_value


async def use_state(
    key: str, default: JsonValue | None = None, *, kvs_name: str | None = None
) -> Any:
    """A plain JSON value (dict or list) that survives restarts, in one line.

    `state = await use_state("progress", {"done": 0})` loads the stored value (or
    a copy of `default`) once; every later call returns the same object. Change
    it in place: it is saved on every PERSIST_STATE and when the event manager is
    left, like a RecoverableState (Crawlee JS `useState`, Apify SDK `Actor.use_state`).

    Args:
        key: the record key.
        default: the value when nothing is stored (`{}` when left out).
        kvs_name: the store, by name; the default store when left out.

    Warning:
        It is saved by the service locator's event manager: call it inside
        `recoverable_state.run()` or an entered `async with manager:`.
    """
    kvs = await KeyValueStore.open(name=kvs_name)
    return await auto_saved_value(kvs, key, default)


def _the_store(kvs: KeyValueStore) -> Any:
    async def factory() -> KeyValueStore:
        return kvs

    return factory


use_auto_saved_values(auto_saved_value)
