"""Event sources: what tells the manager that something happened.

Each source is a small coroutine the manager runs while it is entered. Sources
only call back; deciding what an occurrence means is the manager's job. The
preemption notice poller, which needs an HTTP client, is in _preemption.py;
signals are taken in _shutdown.py.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from ._preemption import PreemptionNotice, PreemptionNoticePoller

logger = logging.getLogger("recoverable_state")


async def tick(
    interval: timedelta,
    on_tick: Callable[[], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_tick` every `interval` (the first call one interval after starting)."""
    seconds = interval.total_seconds()
    task_status.started()
    while True:
        await anyio.sleep(seconds)
        on_tick()


async def run_sources(
    *,
    persist_state_interval: timedelta,
    on_persist_tick: Callable[[], None],
    system_info_interval: timedelta | None,
    on_system_info: Callable[[], None],
    preemption: PreemptionNoticePoller | None,
    on_notice: Callable[[PreemptionNotice], None],
    started: Callable[[], None],
) -> None:
    """Run every source of an entered manager until cancelled.

    The first PERSIST_STATE (and SYSTEM_INFO, when asked for) comes as the
    sources start, as Crawlee's recurring tasks do: a listener registered right
    after entering the manager still gets them. `started()` is called after them.
    """
    on_persist_tick()
    if system_info_interval is not None:
        on_system_info()
    started()
    async with anyio.create_task_group() as sources:
        sources.start_soon(_alone, "the PERSIST_STATE timer", tick, persist_state_interval, on_persist_tick)
        if system_info_interval is not None:
            sources.start_soon(_alone, "the SYSTEM_INFO timer", tick, system_info_interval, on_system_info)
        if preemption is not None:
            sources.start_soon(_alone, "the preemption notice poller", preemption.watch, on_notice)


async def _alone(name: str, source: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run one source; its failure is logged and ends it alone (the timer goes on without the poller)."""
    try:
        await source(*args)
    except Exception:
        logger.exception("%s of the EventManager failed; the other event sources go on", name)


def system_info() -> dict[str, float | int]:
    """What the process knows of its machine and itself, cheaply."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    load1 = os.getloadavg()[0]
    return {
        "cpu_count": os.cpu_count() or 1,
        "load_avg_1m": load1,
        "max_rss_bytes": usage.ru_maxrss * 1024,
        "cpu_user_secs": usage.ru_utime,
        "cpu_system_secs": usage.ru_stime,
    }
