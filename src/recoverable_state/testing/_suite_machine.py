"""The stateful conformance check: random runs of requests, faults and restarts against a small model.

Hypothesis drives a `RecordMachine` through writes (conditional or not, with
history), deletes, claims, reads, faults injected through `FaultInjectingBackend`
and reopening the backend; after every step the store must hold what the
model (a dict of versions and values) holds, and every answer must be the
model's. The machine runs in a blocking portal, on asyncio and on trio.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._errors import StorageError
from ..storage import RecordDelete, RecordRead, RecordWrite, StoredRecord, WriteOp, WriteOutcome
from ._faults import FaultInjectingBackend
from ._suite import BYTES, MakeBackend, Suite

T = TypeVar("T")

KEYS = ["a", "b", "ключ/.x"]
EXPECT = ["any", "any", "current", "absent", "stale", "ahead"]
"""How a request's expected version is chosen, from the version the model holds when it runs."""

write_op = st.tuples(
    st.just("write"), st.sampled_from(KEYS), st.sampled_from(EXPECT), st.binary(max_size=8), st.integers(0, 2)
)
delete_op = st.tuples(
    st.just("delete"), st.sampled_from(KEYS), st.sampled_from(EXPECT), st.just(b""), st.just(0)
)
batches = st.lists(st.one_of(write_op, write_op, delete_op), min_size=1, max_size=5)
claims = st.lists(st.tuples(st.sampled_from(KEYS), st.booleans()), min_size=1, max_size=4)


class RecordMachine(RuleBasedStateMachine):
    """One store, the model of it, and the backend (behind a fault injector) that must agree."""

    def __init__(
        self, portal: BlockingPortal, make_backend: MakeBackend, keeps_history: bool, durable: bool
    ) -> None:
        super().__init__()
        self.portal = portal
        self.make_backend = make_backend
        self.keeps_history = keeps_history
        self.durable = durable
        self.records: dict[str, tuple[int, bytes]] = {}
        self.history: dict[str, list[tuple[int, bytes]]] = {}
        self.storage = FaultInjectingBackend(make_backend())
        store = self.call(functools.partial(self.storage.open_store, name=f"machine-{uuid.uuid4().hex[:12]}"))
        self.store_id = store.id

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        return self.portal.call(fn)

    def teardown(self) -> None:
        self.call(self.storage.aclose)

    # -- the model ------------------------------------------------------------------

    def requests(self, batch: Sequence[tuple[str, str, str, bytes, int]]) -> list[WriteOp]:
        """The batch as requests, each expected version chosen from the version its key will be at."""
        shadow = {key: version for key, (version, _) in self.records.items()}
        ops: list[WriteOp] = []
        for kind, key, how, value, keep in batch:
            current = shadow.get(key, 0)
            expected = {"any": None, "current": current, "absent": 0, "stale": max(current - 1, 0)}.get(
                how, current + 1
            )
            if kind == "delete":
                ops.append(RecordDelete(self.store_id, key, expected))
            else:
                ops.append(
                    RecordWrite(self.store_id, key, value, BYTES, expected, keep if self.keeps_history else 0)
                )
            if expected is None or expected == current:
                if kind == "delete":
                    shadow.pop(key, None)
                else:
                    shadow[key] = current + 1
        return ops

    def apply(self, op: WriteOp) -> WriteOutcome:
        """One request, as the contract says, on the model."""
        version = self.records.get(op.key, (0, b""))[0]
        if op.expected_version is not None and op.expected_version != version:
            return WriteOutcome(False, version)
        if isinstance(op, RecordDelete):
            if op.key not in self.records:
                return WriteOutcome(False, 0)
            del self.records[op.key]
            self.history.pop(op.key, None)
            return WriteOutcome(True, 0)
        assert isinstance(op, RecordWrite), "the machine makes writes and deletes"
        self.records[op.key] = (version + 1, op.value)
        if op.keep_history:
            kept = self.history.setdefault(op.key, [])
            kept.insert(0, (version + 1, op.value))
            del kept[op.keep_history :]
        return WriteOutcome(True, version + 1)

    def claim(self, key: str, claim: bool) -> int | None:
        if key not in self.records:
            return None
        version, value = self.records[key]
        if claim:
            self.records[key] = (version := version + 1, value)
        return version

    # -- the rules ------------------------------------------------------------------

    @rule(batch=batches)
    def write_batch(self, batch: list[tuple[str, str, str, bytes, int]]) -> None:
        ops = self.requests(batch)
        got = list(self.call(functools.partial(self.storage.write_batch, ops)))
        assert got == [self.apply(op) for op in ops], ops

    @rule(reads=claims)
    def read_batch(self, reads: list[tuple[str, bool]]) -> None:
        got = self.call(
            functools.partial(self.storage.read_batch, [RecordRead(self.store_id, k, c) for k, c in reads])
        )
        want = [self.claim(key, claim) for key, claim in reads]
        assert [r.version if isinstance(r, StoredRecord) else r for r in got] == want, reads

    @rule(batch=batches, when=st.sampled_from(["before", "after", "requests"]), key=st.sampled_from(KEYS))
    def faulty_write_batch(self, batch: list[tuple[str, str, str, bytes, int]], when: str, key: str) -> None:
        """A fault met by a write batch: what the callers were told must be what the store holds."""
        ops = self.requests(batch)
        self.storage.fail_next(when=when, match=(lambda r: r.key == key) if when == "requests" else None)  # type: ignore[arg-type]
        try:
            got: list[WriteOutcome | StorageError] | None = list(
                self.call(functools.partial(self.storage.write_batch, ops))
            )
        except StorageError:
            got = None
        if when == "before":
            assert got is None
        elif when == "after":
            assert got is None
            for op in ops:
                self.apply(op)
        else:
            assert got is not None
            for op, answer in zip(ops, got, strict=True):
                if op.key == key:
                    assert isinstance(answer, StorageError)
                else:
                    assert answer == self.apply(op), op

    @rule(reads=claims, when=st.sampled_from(["before", "after"]))
    def faulty_read_batch(self, reads: list[tuple[str, bool]], when: str) -> None:
        self.storage.fail_next(on="read", when=when)  # type: ignore[arg-type]
        with contextlib.suppress(StorageError):
            self.call(
                functools.partial(
                    self.storage.read_batch, [RecordRead(self.store_id, k, c) for k, c in reads]
                )
            )
            raise AssertionError("the injected fault did not fail the batch")
        if when == "after":  # the claims landed, unknown to the caller
            for key, claim in reads:
                self.claim(key, claim)

    @precondition(lambda self: self.durable)
    @rule()
    def reopen(self) -> None:
        """The process restarts: a new backend over the same data."""
        self.call(self.storage.aclose)
        self.storage = FaultInjectingBackend(self.make_backend())

    @invariant()
    def the_store_holds_the_model(self) -> None:
        listed = self.call(functools.partial(self.storage.list_records, self.store_id))
        assert [(i.key, i.version, i.size) for i in listed] == [
            (key, version, len(value)) for key, (version, value) in sorted(self.records.items())
        ]
        found = self.call(
            functools.partial(self.storage.read_batch, [RecordRead(self.store_id, k) for k in KEYS])
        )
        assert [(r.version, r.value) if isinstance(r, StoredRecord) else r for r in found] == [
            self.records.get(key) for key in KEYS
        ]
        if self.keeps_history:
            for key in KEYS:
                kept = self.call(functools.partial(self.storage.read_history, self.store_id, key))
                assert [(h.version, h.value) for h in kept] == self.history.get(key, []), key


class MachineChecks(Suite):
    """The stateful check, as one test per event loop."""

    def test_random_requests_faults_and_restarts_agree_with_a_model(
        self, anyio_backend: str, make_backend: MakeBackend
    ) -> None:
        run_settings = settings(
            max_examples=self.machine_examples,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        with start_blocking_portal(backend=anyio_backend) as portal:
            run_state_machine_as_test(
                # Any factory will do (hypothesis's annotation says a class).
                lambda: RecordMachine(portal, make_backend, self.keeps_history, self.durable),  # type: ignore[arg-type]
                settings=run_settings,
            )
