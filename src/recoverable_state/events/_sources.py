"""Event sources: what tells the manager that something happened.

Each source is a small coroutine the manager runs in its task group. Sources
only call back; deciding what an occurrence means is the manager's job. The
preemption notice poller, which needs an HTTP client, is in _preemption.py.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Callable
from datetime import timedelta

import anyio
from anyio.abc import TaskStatus

logger = logging.getLogger("recoverable_state")

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def tick(
    interval: timedelta,
    on_tick: Callable[[], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_tick` every `interval`, measured from the end of the previous call."""
    seconds = interval.total_seconds()
    task_status.started()
    while True:
        await anyio.sleep(seconds)
        on_tick()


async def watch_signals(
    on_signal: Callable[[int], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_signal(signum)` for each SIGTERM and SIGINT while this runs.

    Works on asyncio and trio alike, and only in the main thread (as any
    signal handling does). The previous handlers come back when it ends.
    """
    with anyio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            on_signal(int(signum))


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
