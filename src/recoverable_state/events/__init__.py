"""Events: the EventManager, the events it emits and their payloads."""

from ._manager import EventManager, Listener, ShutdownSignalReceived
from ._preemption import (
    AWS_SPOT_NOTICE_URL,
    GCP_PREEMPTED_URL,
    PreemptionNotice,
    PreemptionNoticePoller,
)
from ._types import (
    Event,
    EventAbortingData,
    EventData,
    EventExitData,
    EventMigratingData,
    EventPersistStateData,
    EventStateOwnershipLostData,
    EventSystemInfoData,
)

__all__ = [
    "AWS_SPOT_NOTICE_URL",
    "GCP_PREEMPTED_URL",
    "Event",
    "EventAbortingData",
    "EventData",
    "EventExitData",
    "EventManager",
    "EventMigratingData",
    "EventPersistStateData",
    "EventStateOwnershipLostData",
    "EventSystemInfoData",
    "Listener",
    "PreemptionNotice",
    "PreemptionNoticePoller",
    "ShutdownSignalReceived",
]
