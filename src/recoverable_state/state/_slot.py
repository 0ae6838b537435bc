"""One state's place in a store: its live value, what the store holds of it, and its write gate.

A `StateSlot` holds what the store side of a state needs: the live value, the
version and bytes last known stored, a write in doubt, and a write gate. The
engine (`_engine.py`) is the only code that loads or writes slots; it calls
their methods and never reaches into a state's fields.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from .._errors import StateOwnershipLost, UnrepresentableStateError
from ..storage import (
    CHAIN_CONTENT_TYPE,
    DELTA_CONTENT_TYPE,
    KeyValueStore,
    RecordAppend,
    RecordWrite,
    StoredRecord,
    WriteOutcome,
    unpack_chain,
)
from ._codec import Refused, StateCodec
from ._deltas import DELTA_FROM_BYTES, MAX_DELTAS, build_delta
from ._editing import EditGuard
from ._gate import WriteGate
from ._schema import Migration
from ._tracking import ChangeMark
from ._watch_plan import apply, plan_for
from ._watching import model_trackable, watch

OnBadRecord = Literal["raise", "quarantine", "previous"]
SlotSettings = tuple[int, Mapping[int, Migration], OnBadRecord, float | None, bool, bool]
"""What many states share: (history, migrations, on_bad_record, timeout in seconds, track, deltas)."""

DELETE_IN_DOUBT = b""
"""`in_doubt` of a delete whose outcome is unknown (no state serialises to empty bytes)."""


class StateSlot:
    """The store side of one state: its value, what the store holds of it, and its write gate."""

    __slots__ = (
        "_refusal",
        "appendable",
        "behind",
        "chain_bytes",
        "chain_deltas",
        "codec",
        "content_type",
        "delta_bytes",
        "deltas",
        "editing",
        "enabled",
        "fresh",
        "gate",
        "handed",
        "history",
        "in_doubt",
        "key",
        "kvs",
        "log",
        "lost",
        "mark",
        "migrations",
        "on_bad_record",
        "owner",
        "schema_version",
        "stored",
        "synced",
        "timeout",
        "track",
        "tracked",
        "value",
        "version",
    )

    def __init__(
        self,
        key: str,
        codec: StateCodec,
        schema_version: int | None,
        settings: SlotSettings,
        log: logging.Logger,
        owner: weakref.ref[Any],
    ) -> None:
        history, migrations, on_bad_record, timeout, track, deltas = settings
        self.key = key
        self.codec = codec
        self.content_type = codec.content_type
        self.schema_version = schema_version
        self.migrations = migrations
        self.on_bad_record = on_bad_record
        self.history = history
        self.timeout = timeout
        """Seconds each load and save of this state may take (None: no bound)."""
        self.log = log
        self.owner = owner
        """The state this slot belongs to, weakly (told when another process takes the record over)."""
        self.kvs: KeyValueStore | None = None
        self.enabled = False  # whether persists write (initialized, persistence on)
        self.value: Any = None
        self.version = 0  # the stored version this process last read or wrote (0: none)
        self.stored: int | None = None  # fingerprint() of what the store holds, as far as we know
        self.in_doubt: bytes | None = None  # bytes of a write whose outcome is unknown
        self.lost = False
        self.behind = False  # the store went back past this state's last write: write it again
        self.gate = WriteGate()
        self.editing: EditGuard | None = None  # made by state.editing(): no snapshot mid-update
        self._refusal: str | None = None  # the last refusal logged, to log each once
        # Change tracking (see _tracking.py): a value not yet handed out cannot change; one
        # handed out and `tracked` changed only if its `mark` is dirty; `synced`: the store
        # holds what the value serialises to, as of the last look.
        self.track = track
        self.mark = ChangeMark()
        self.handed = False
        self.tracked = False
        self.synced = False
        self.fresh = False
        # Deltas (see _deltas.py): whether this state may write them at all; whether the store
        # holds what this process last wrote or read at `version` (an append may follow it);
        # and the record's shape as far as known: its snapshot's bytes, its deltas' bytes and
        # their number. (Three ints, not a tuple: a persist of 100,000 states made 100,000
        # tuples, and the collector's next pass scanned them while the event loop waited.)
        self.deltas = deltas and track and history == 0 and codec.delta_safe
        self.appendable = False
        self.chain_bytes, self.delta_bytes, self.chain_deltas = 0, 0, 0

    def hand_out(self) -> Any:
        """The live value, for the worker: from now on it may change, so it is watched."""
        if not self.handed:
            self.handed = True
            if self.track and self.enabled and not self.tracked:
                mark = self.mark
                mark.note_where(self._logs(self.chain_bytes))  # before the watch: it links the parts then
                if not self.watch_loaded():
                    self.tracked = watch(self, mark)
                mark.note_where(mark.log and self.tracked)
        return self.value

    def watch_loaded(self) -> bool:
        """Watch a value pydantic just validated, as its schema says; False when its kind cannot be.

        A load calls it for every state it validates, not only for those handed out
        later: while a big load has the collector paused, the containers it makes here
        become old with the rest of the load. Made at the first `current_value`, each
        replacing a dict or a list the load made, they left the collector's count of
        young objects as it was: nothing scanned them until the first persist, which
        then waited for a scan of every one of them (150 ms at 100,000 states).
        """
        value = self.value
        if not (self.track and self.fresh and isinstance(value, BaseModel)):
            return False
        plan = plan_for(type(value))
        if plan is None:
            return False
        mark = self.mark
        if not self.handed:  # hand_out has set it, else it is set here
            mark.note_where(self._logs(self.chain_bytes))
        apply(value, plan, mark)
        self.tracked = True
        return True

    def _logs(self, snapshot_size: int) -> bool:
        """Whether the tracking should note where changes happen: the next persist may write a delta."""
        kvs = self.kvs
        return (
            self.deltas
            and snapshot_size >= DELTA_FROM_BYTES
            and kvs is not None
            and kvs.storage.keeps_deltas
            and model_trackable(type(self.value))
        )

    def take(self, value: Any, *, synced: bool, fresh: bool = False) -> None:
        """Make `value` (nobody else holds it) the live value.

        `synced`: the store holds it; `fresh`: pydantic just validated it, so it holds
        exactly the types its schema declares.
        """
        self.value = value
        self.mark = ChangeMark()
        self.handed = False
        self.tracked = False
        self.synced = synced
        self.fresh = fresh
        self.appendable = False

    def changed(self) -> None:
        """The value was changed in a way the mark cannot see (a reset): look at it next persist."""
        self.synced = False
        self.appendable = False
        if self.handed and self.track and self.enabled:
            self.tracked = watch(self, self.mark)

    @property
    def unchanged(self) -> bool:
        """Whether the store is known to hold the value as it is, without serialising it."""
        return self.synced and not self.mark.dirty and (self.tracked or not self.handed)

    @property
    def label(self) -> str:
        """The store's name for messages."""
        return self.kvs.label if self.kvs is not None else "?"

    @property
    def log_fields(self) -> dict[str, str]:
        """The structured fields of every log line about this state (`extra=`): store and key."""
        return {"store": self.label, "key": self.key}

    # -- writing ---------------------------------------------------------------

    def prepare(
        self, warned: list[warnings.WarningMessage], full: bool = False
    ) -> RecordWrite | RecordAppend | None:
        """The write this slot needs now (None: nothing changed); raises UnrepresentableStateError.

        `warned` records warnings: pydantic warns when a value does not have its
        declared type (it was assigned without validation), which calls for a full check.
        `full`: serialise and compare even if no change was seen (a change made behind
        the watched containers' backs, as `heapq` does, is found this way).
        """
        mark = self.mark
        if not full and self.synced and not mark.dirty and (self.tracked or not self.handed):
            return None  # `unchanged`, inlined: a big persist asks every state
        if mark.log and self.appendable and self.tracked:
            return self._delta(warned)
        if mark.changed:
            mark.forget_changes()  # the snapshot holds every change noted so far
        mark.dirty = False  # cleared before serialising: a change made from now on sets it again
        self.synced = False
        codec = self.codec
        seen = len(warned)
        try:
            data = codec.serializer.to_json(self.value, by_alias=True)
        except PydanticSerializationError:
            try:
                data = codec.dump_leniently(self.value)
            except Refused as refused:
                raise self._refuse(refused) from None
        if self.handed and self.track and (mark.adopt or not self.tracked):
            mark.adopt = False
            self.tracked = watch(self, mark)  # watch the parts put in since the last look
        if (hash(data) & _HASH_BITS) | (len(data) << 64) == self.stored:  # fingerprint(), inlined
            self.synced = True
            return None
        suspect = len(warned) != seen
        if suspect or codec.needs_check:
            try:
                data = codec.check(self.value, data, suspect=suspect)
            except Refused as refused:
                raise self._refuse(refused) from None
        kvs = self.kvs
        assert kvs is not None
        if self.deltas and self.handed and self.tracked:
            logs = self._logs(len(data))
            if logs and not mark.log:  # now big enough for deltas: link every part to its place
                mark.note_where(True)
                self.tracked = watch(self, mark)
            mark.note_where(logs and self.tracked)
        fields = (kvs.id, self.key, data, self.content_type, self.version, self.history)
        return _new_write(RecordWrite, fields)

    def _delta(self, warned: list[warnings.WarningMessage]) -> RecordWrite | RecordAppend | None:
        """The append of what the tracking noted since the last persist; a snapshot when it cannot be one.

        A state kept as deltas is not compared in full every few persists: a change made
        behind the tracking's back reaches the store with its next snapshot.
        """
        mark = self.mark
        mark.dirty = False
        notes = mark.forget_changes()
        if not notes:
            self.synced = True  # nothing was noted: nothing to write
            return None
        seen = len(warned)
        try:
            delta = build_delta(self.value, notes, self.codec.serializer)
        except PydanticSerializationError:
            delta = None
        size, delta_bytes, count = self.chain_bytes, self.delta_bytes, self.chain_deltas
        if (
            delta is None
            or len(warned) != seen
            or not self.codec.loads_back_plainly(delta)
            or delta_bytes + len(delta) > size
            or count >= MAX_DELTAS
        ):
            self.appendable = False  # the notes are taken: only a snapshot holds them now
            return self.prepare(warned, full=True)
        self.synced = False
        if mark.adopt:
            mark.adopt = False
            self.tracked = watch(self, mark)  # watch the parts put in since the last look
            mark.note_where(mark.log and self.tracked)
        kvs = self.kvs
        assert kvs is not None
        return _new_write(RecordAppend, (kvs.id, self.key, delta, DELTA_CONTENT_TYPE, self.version))

    def _refuse(self, refused: Refused) -> UnrepresentableStateError:
        error = UnrepresentableStateError(
            f"field {refused.field!r} {refused.reason}; the state was not persisted and the "
            "stored record is unchanged",
            store=self.label,
            key=self.key,
            field=refused.field,
        )
        if str(error) != self._refusal:  # a timer tick repeats it: log each distinct one once
            self._refusal = str(error)
            self.log.error("%s", error, extra=self.log_fields)
        return error

    def settle(self, outcome: WriteOutcome, data: bytes, delta: bool = False) -> StateOwnershipLost | None:
        """Record a write's outcome; a compare-and-set lost to a newer record gives the state up.

        A record older than the one this process wrote, or none where it wrote one,
        means the store went back (a failover to a standby that had not received
        the last commits, a server restarted empty): that is not another owner. The
        state takes the stored version and is marked `behind`, to be written again.
        """
        if outcome.applied:
            self.version, self._refusal, self.synced, self.appendable = outcome.version, None, True, True
            if delta:
                self.delta_bytes += len(data)
                self.chain_deltas += 1
                self.stored = None
            else:
                self.chain_bytes, self.delta_bytes, self.chain_deltas = len(data), 0, 0
                self.stored = fingerprint(data)
            return None
        self.appendable = False
        if outcome.version < self.version:
            self.log.warning(
                "store %r, key %r: the store holds version %d, older than version %d that this process "
                "wrote: the server lost writes (a failover, or a restart without its data); writing the "
                "state again",
                self.label,
                self.key,
                outcome.version,
                self.version,
                extra=self.log_fields,
            )
            self.version, self.stored, self.synced, self.behind = outcome.version, None, False, True
            return None
        self.lost = True
        self.enabled = False
        error = StateOwnershipLost(
            f"the stored record is at version {outcome.version}, not {self.version} as this "
            "process last saw it: another process has taken this state over; this snapshot "
            "was not written and the state is no longer persisted from here",
            store=self.label,
            key=self.key,
        )
        self.log.error("%s", error, extra=self.log_fields)
        owner = self.owner()
        if owner is not None:
            owner.ownership_lost(error)
        return error

    def resolve(self, record: StoredRecord | None) -> bool:
        """Settle a write in doubt from what the store holds (read without claiming); whether it landed."""
        data, self.in_doubt = self.in_doubt, None
        if data == DELETE_IN_DOUBT:
            if record is None:  # the delete had landed (or someone else's did): nothing is stored
                self.version, self.stored = 0, None
                return True
            return False
        if record is not None and record.version == self.version + 1 and record.value == data:
            self.version, self.stored = record.version, fingerprint(data)  # it had landed
            self.chain_bytes, self.delta_bytes, self.chain_deltas = len(data), 0, 0
            self.appendable = True
            return True
        if (
            record is not None
            and record.version == self.version + 1
            and record.content_type == CHAIN_CONTENT_TYPE
            and unpack_chain(record.value)[-1][0] == data
        ):
            self.version, self.stored = record.version, None  # the delta in doubt had landed
            self.delta_bytes += len(data)
            self.chain_deltas += 1
            self.appendable = True
            return True
        self.appendable = False
        # Otherwise it had not; a successor, if any, shows in the next write's compare-and-set.
        return False


_new_write = tuple.__new__
"""Builds a RecordWrite from all its fields: 0.6 of the time calling the class takes (it is in Python)."""


def fingerprint(data: bytes) -> int:
    """What a state keeps of the bytes last stored: their length and 64-bit hash.

    Keeping the bytes themselves cost 650 B a state of 600 B. The price: a changed
    snapshot with the same length and hash as the stored one (a chance of about 1
    in 2**64 a changed persist) would be taken as unchanged and not written.
    Python's bytes hash is computed once per bytes object and kept in it.
    """
    return (hash(data) & _HASH_BITS) | (len(data) << 64)


_HASH_BITS = 0xFFFF_FFFF_FFFF_FFFF


def fingerprinted_size(stored: int | None) -> int:
    """The length of the bytes a fingerprint was taken of (0 for None)."""
    return 0 if stored is None else stored >> 64


def smallest_timeout(slots: Iterable[StateSlot]) -> float | None:
    """The tightest persistence timeout among `slots` (None: none is bounded)."""
    bounded = [s.timeout for s in slots if s.timeout is not None]
    return min(bounded) if bounded else None


class Tally:
    """What a persist wrote: states and bytes (for `manager.stats`), counted as it settles."""

    __slots__ = ("bytes", "states")

    def __init__(self) -> None:
        self.states = 0
        self.bytes = 0

    def landed(self, size: int) -> None:
        self.states += 1
        self.bytes += size
