"""Pausing the cyclic garbage collector while a big batch builds long-lived objects."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

PAUSE_COLLECTOR_AT = 10_000
"""States in one batch from which the collector is paused while they are built or written."""


@contextlib.contextmanager
def collector_paused(*, active: bool = True, settle: bool = False) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batch builds many long-lived objects.

    Validating 100,000 records allocates millions of objects, and the collector
    would scan the growing heap again and again (0.7 s of 2.7 s, and growing
    faster than the batch). The batch makes no cycles; the collector runs as
    usual afterwards.

    (The library never calls `gc.freeze()`: that would exempt the application's
    own objects from collection for good, a choice only the application can make.)

    `active`: False leaves the collector alone. `settle` (a load): one full
    collection before the collector is back. What the batch made stays, and was
    made young: left so, the collector would scan it three times over the next
    seconds (young, middle, then the whole heap, the last one set off because so
    much had become old at once), 2.3 s at 100,000 states and the longest 1.1 s,
    in the middle of the worker's first persist. One full pass makes it old at
    once: 0.9-1.1 s at the end of that load, where the loop waits on the load anyway.
    """
    if not active or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if settle:  # before enabling it: the next allocation would start a full pass of its own
            gc.collect()
        gc.enable()
