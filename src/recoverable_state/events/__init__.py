"""Events: the EventManager, the events it emits and their payloads."""

from ._defaults import default_event_manager, event_manager_from_configuration
from ._manager import (
    EventManager,
    Listener,
    OnSignal,
    PreemptionNoticeKind,
    ShutdownSignalReceived,
    exit_guard,
)
from ._preemption import (
    AWS_SPOT_NOTICE_URL,
    GCP_PREEMPTED_URL,
    PreemptionNotice,
    PreemptionNoticePoller,
)
from ._shutdown import EXIT_NOT_PERSISTED, EventLoopStarved
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
)

__all__ = [
    "AWS_SPOT_NOTICE_URL",
    "EXIT_NOT_PERSISTED",
    "GCP_PREEMPTED_URL",
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
    "Listener",
    "OnSignal",
    "PreemptionNotice",
    "PreemptionNoticeKind",
    "PreemptionNoticePoller",
    "ShutdownSignalReceived",
    "default_event_manager",
    "event_manager_from_configuration",
    "exit_guard",
]
