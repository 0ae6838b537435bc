"""Events: the EventManager, the events it emits and their payloads."""

from ._manager import EventManager, Listener, ShutdownSignalReceived
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
    "ShutdownSignalReceived",
]
