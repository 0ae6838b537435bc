"""Events and their payloads (pydantic models with the camelCase JSON aliases)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from .._config import Seconds


class Event(StrEnum):
    """The events an EventManager emits."""

    PERSIST_STATE = "persistState"
    """Save your state now (on a timer, and before shutdown or migration)."""
    MIGRATING = "migrating"
    """The process is about to be moved to another machine (SIGTERM, preemption notice)."""
    ABORTING = "aborting"
    """The process is being stopped by the user (SIGINT)."""
    EXIT = "exit"
    """The process is about to exit."""
    SYSTEM_INFO = "systemInfo"
    """Periodic information about the machine."""
    STATE_OWNERSHIP_LOST = "stateOwnershipLost"
    """Another process took over a state of this one; stop working on it."""
    PERSISTED = "persisted"
    """A PERSIST_STATE round of the manager's states ended; the payload carries its figures."""


_SecondsOut = PlainSerializer(lambda v: v.total_seconds() if v is not None else None)


class _Payload(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True)


class EventPersistStateData(_Payload):
    """Data of PERSIST_STATE."""

    is_migrating: Annotated[bool, Field(alias="isMigrating")] = False
    """True when this is the last persist before the process moves or stops."""


class EventMigratingData(_Payload):
    """Data of MIGRATING."""

    time_remaining: Annotated[Seconds | None, Field(alias="timeRemainingSecs"), _SecondsOut] = None
    """How long until the process is stopped, when known."""


class EventAbortingData(_Payload):
    """Data of ABORTING."""


class EventExitData(_Payload):
    """Data of EXIT."""


class EventSystemInfoData(_Payload):
    """Data of SYSTEM_INFO: what the process knows of its machine."""

    info: dict[str, Any] = Field(default_factory=dict)


class EventStateOwnershipLostData(_Payload):
    """Data of STATE_OWNERSHIP_LOST: which state this process may no longer write."""

    store: str
    key: str


class EventPersistedData(_Payload):
    """Data of PERSISTED: what one persist of the manager's states did."""

    duration: Annotated[timedelta, Field(alias="durationSecs"), _SecondsOut]
    """How long the persist took."""
    states_written: Annotated[int, Field(alias="statesWritten")] = 0
    """States whose record was written (a state that did not change is not written)."""
    bytes_written: Annotated[int, Field(alias="bytesWritten")] = 0
    """Bytes of the records written."""
    failures: Mapping[str, int] = Field(default_factory=dict)
    """States not persisted, by error kind (the exception's class name)."""
    is_migrating: Annotated[bool, Field(alias="isMigrating")] = False
    """Whether it was the last persist before the process moves or stops."""
    finished_at: Annotated[datetime, Field(alias="finishedAt")] = Field(
        default_factory=lambda: datetime.now(UTC)
    )
    """When it ended."""

    @property
    def succeeded(self) -> bool:
        """Whether every state was persisted."""
        return not self.failures

    @property
    def complete(self) -> bool:
        """Whether every state this process still owns was persisted.

        A state another process took over (StateOwnershipLost) is that process's to
        save; every other failure leaves a state unsaved (a shutdown then exits 75).
        """
        return all(kind == "StateOwnershipLost" for kind in self.failures)


@runtime_checkable
class ReportsUnfinished(Protocol):
    """A listener object that can say what it leaves unsaved when it is left behind.

    When a listener is still running after the close timeout (and a second of
    grace), the manager logs each item `describe_unfinished()` returns.
    """

    def describe_unfinished(self) -> list[str]:
        """What this listener has not finished, one line each (store and key of each state)."""


EventData = (
    EventPersistStateData
    | EventMigratingData
    | EventAbortingData
    | EventExitData
    | EventSystemInfoData
    | EventStateOwnershipLostData
    | EventPersistedData
)

__all__ = [
    "Event",
    "EventAbortingData",
    "EventData",
    "EventExitData",
    "EventMigratingData",
    "EventPersistStateData",
    "EventPersistedData",
    "EventStateOwnershipLostData",
    "EventSystemInfoData",
    "ReportsUnfinished",
]
