"""Events: the EventManager, the events it emits and their payloads."""

from ._bus import Listener
from ._defaults import default_event_manager, event_manager_from_configuration
from ._manager import (
    NOT_ACTIVE,
    EventManager,
    HandleSignals,
    OnSignal,
    PreemptionNoticeKind,
)
from ._preemption import (
    AWS_SPOT_NOTICE_URL,
    GCP_PREEMPTED_URL,
    PreemptionNotice,
    PreemptionNoticePoller,
)
from ._shutdown import (
    EXIT_GRACE,
    EXIT_NOT_PERSISTED,
    EventLoopStarved,
    ExitWatchdog,
    ShutdownSignalReceived,
    exit_code,
    exit_guard,
    hard_exit,
    shutdown_signals,
)
from ._types import (
    Event,
    EventAbortingData,
    EventData,
    EventExitData,
    EventMigratingData,
    EventPersistedData,
    EventPersistStateData,
    EventStateOwnershipLostData,
    EventSystemInfoData,
    ReportsUnfinished,
)

__all__ = [
    "AWS_SPOT_NOTICE_URL",
    "EXIT_GRACE",
    "EXIT_NOT_PERSISTED",
    "GCP_PREEMPTED_URL",
    "NOT_ACTIVE",
    "Event",
    "EventAbortingData",
    "EventData",
    "EventExitData",
    "EventLoopStarved",
    "EventManager",
    "EventMigratingData",
    "EventPersistStateData",
    "EventPersistedData",
    "EventStateOwnershipLostData",
    "EventSystemInfoData",
    "ExitWatchdog",
    "HandleSignals",
    "Listener",
    "OnSignal",
    "PreemptionNotice",
    "PreemptionNoticeKind",
    "PreemptionNoticePoller",
    "ReportsUnfinished",
    "ShutdownSignalReceived",
    "default_event_manager",
    "event_manager_from_configuration",
    "exit_code",
    "exit_guard",
    "hard_exit",
    "shutdown_signals",
]
