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
from collections.abc import Callable
from datetime import timedelta

import anyio
from anyio.abc import TaskStatus

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
