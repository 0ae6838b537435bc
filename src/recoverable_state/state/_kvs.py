"""The front door's KeyValueStore, with auto-saved values: `use_state` and `get_auto_saved_value`.

For a worker without a model: a plain JSON dict (or list) loaded once, the same
object handed out on every call, and saved like any RecoverableState (on every
PERSIST_STATE and on leaving the event manager, batched and fenced). The
storage layer's `KeyValueStore` knows records only; this subclass adds the
values that persist themselves, which need the states above storage.
"""

from __future__ import annotations

import weakref
from typing import Any

import anyio

from ..events import default_event_manager
from ..storage import KeyValueStore as _StorageKeyValueStore
from ..storage import StorageBackend, check_key
from ._core import NO_STORE, StateCore, settings_for

JsonValue = dict[str, Any] | list[Any]

CRAWLEE_STATE_KEY = "CRAWLEE_STATE"
"""The key `use_state(default)` keeps its value under when no key is given, as Crawlee does."""

# The live value of each (storage, store id, key). A value lives while its core listens for
# PERSIST_STATE (its manager's group holds it); the entry goes with it.
_values: weakref.WeakValueDictionary[tuple[StorageBackend, str, str], StateCore] = (
    weakref.WeakValueDictionary()
)
_loading: dict[tuple[StorageBackend, str, str], anyio.Lock] = {}


class KeyValueStore(_StorageKeyValueStore):
    """A named store of records in a storage backend, and of auto-saved values.

    Open one with `await KeyValueStore.open(name=..., id=...)`; without either,
    the default store. Opening a store that is open already returns the same
    object, until the store is dropped. Values are JSON, text or bytes, chosen by
    their type or by an explicit content type.
    """

    async def get_auto_saved_value(self, key: str, default: Any = None, *, default_value: Any = None) -> Any:
        """A plain JSON value (dict or list) under `key`: loaded once, the same object on every call.

        Change it in place: it is saved on every PERSIST_STATE of the service
        locator's event manager and when that manager is left, through the same
        batched, fenced writes as a RecoverableState. `default` (or Crawlee's
        `default_value`) is deep-copied when nothing is stored; `{}` when left out.
        """
        check_key(key, store=self.label)
        return await _auto_saved_value(self, key, default if default is not None else default_value)

    async def persist_autosaved_values(self) -> None:
        """Save every auto-saved value of this store now (Crawlee's name); returns once durable."""
        mine = (self.storage, self.id)
        cores = [
            core for (storage, store_id, _), core in list(_values.items()) if (storage, store_id) == mine
        ]
        await StateCore.persist_many([core for core in cores if core.active])


async def open_store(name: str | None, id: str | None) -> KeyValueStore:
    """Open a store of the default storage by name or id, as the front door's class."""
    kvs = await KeyValueStore.open(name=name, id=id)
    assert isinstance(kvs, KeyValueStore)  # `open` makes objects of the class it is called on
    return kvs


async def use_state(
    key: str | JsonValue | None = None, default: JsonValue | None = None, *, kvs_name: str | None = None
) -> Any:
    """A plain JSON value (dict or list) that survives restarts, in one line.

    `state = await use_state("progress", {"done": 0})` loads the stored value (or
    a copy of `default`) once; every later call returns the same object. Change
    it in place: it is saved on every PERSIST_STATE and when the event manager is
    left, like a RecoverableState. Crawlee's form, `await use_state({"runs": 0})`,
    keeps the value under Crawlee's key, `CRAWLEE_STATE`.

    Args:
        key: the record key; or, in Crawlee's form, the default value itself.
        default: the value when nothing is stored (`{}` when left out).
        kvs_name: the store, by name; the default store when left out.

    Warning:
        It is saved by the service locator's event manager: call it inside
        `recoverable_state.run()` or an entered `async with manager:`.
    """
    if key is None or isinstance(key, dict | list):
        if default is not None:
            raise TypeError("use_state(default) takes the default once: use use_state(key, default)")
        record_key, default = CRAWLEE_STATE_KEY, key
    else:
        record_key = key
    kvs = await open_store(kvs_name, None)
    return await kvs.get_auto_saved_value(record_key, default)


async def _auto_saved_value(kvs: KeyValueStore, key: str, default: JsonValue | None) -> Any:
    """The auto-saved value under `key` in `kvs`: loaded on first use, then the same object."""
    if default is None:
        default = {}
    if not isinstance(default, dict | list):
        raise TypeError(
            f"store {kvs.label!r}, key {key!r}: an auto-saved value is a dict or a list "
            f"(plain JSON), not {type(default).__name__}; use RecoverableState for other types"
        )
    ident = (kvs.storage, kvs.id, key)
    manager = default_event_manager.get()
    core = _values.get(ident)
    if core is not None and (core.manager() is not manager or not core.active):
        # Loaded under an earlier run's manager, which no longer saves it: hand it over.
        del _values[ident]
        await core.teardown()
        core = None
    if core is None:
        lock = _loading.setdefault(ident, anyio.Lock())
        try:
            async with lock:  # two first calls at once load it once
                core = _values.get(ident)
                if core is None:
                    core = await _load(kvs, key, default)
                    _values[ident] = core
        finally:
            if not lock.locked():
                _loading.pop(ident, None)
    assert core.slot is not None
    return core.slot.hand_out()


async def _load(kvs: KeyValueStore, key: str, default: JsonValue) -> StateCore:
    async def this_store() -> KeyValueStore:
        return kvs

    core = StateCore(
        key,
        default,
        None,
        dict[str, Any] if isinstance(default, dict) else list[Any],
        True,
        NO_STORE,
        this_store,
        open_store,
        None,
        None,
        settings_for(0, {}, "raise", 60.0, True),
    )
    errors = await StateCore.initialize_many([core])
    if errors:
        raise errors[0]
    return core
