"""The record contract's planner, checked against a plain model of a store.

Random sequences of write batches (compare-and-set, deletes, history, missing
stores), claims and records that fail to be stored are run twice: through the
planner, applied as a backend applies it, and through a model that does one
request after another. After every step the two stores must be equal, and
every caller must have been told what the store holds.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from recoverable_state import StorageError, StoreNotFoundError
from recoverable_state.storage import (
    RecordDelete,
    RecordRead,
    RecordWrite,
    StoredRecord,
    WriteOutcome,
    claim_reads,
    expected_outcomes,
    fail_records,
    plan_reads,
    plan_writes,
)

STORES = ["s1", "s2", "gone"]
KEYS = ["a", "b", "c"]
NOW = datetime(2026, 1, 1, tzinfo=UTC)

Pair = tuple[str, str]

write_strategy = st.builds(
    lambda store, key, value, expected, keep: (store, key, value, expected, keep),
    st.sampled_from(STORES),
    st.sampled_from(KEYS),
    st.one_of(st.binary(max_size=4), st.none()),  # None: a delete
    st.one_of(st.none(), st.integers(0, 6)),
    st.integers(0, 3),
)


class Model:
    """A store that does one request after another, as the contract says."""

    def __init__(self) -> None:
        self.records: dict[Pair, tuple[int, bytes]] = {}
        self.history: dict[Pair, list[tuple[int, bytes]]] = {}

    def write(self, w: RecordWrite | RecordDelete) -> WriteOutcome:
        pair = (w.store_id, w.key)
        stored = self.records.get(pair, (0, b""))[0]
        if w.expected_version is not None and w.expected_version != stored:
            return WriteOutcome(False, stored)
        if isinstance(w, RecordDelete):
            if pair not in self.records:
                return WriteOutcome(False, 0)
            del self.records[pair]
            self.history.pop(pair, None)
            return WriteOutcome(True, 0)
        self.records[pair] = (stored + 1, w.value)
        if w.keep_history > 0:
            kept = self.history.setdefault(pair, [])
            kept.insert(0, (stored + 1, w.value))
            del kept[w.keep_history :]
        return WriteOutcome(True, stored + 1)


class PlannerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.store = Model()  # what the planner's answers, applied, leave behind
        self.missing = {"gone": StoreNotFoundError("no such store", store="gone")}

    @rule(
        batch=st.lists(write_strategy, min_size=1, max_size=8),
        failing=st.sets(st.tuples(st.sampled_from(STORES[:2]), st.sampled_from(KEYS)), max_size=2),
    )
    def write_batch(
        self, batch: list[tuple[str, str, bytes | None, int | None, int]], failing: set[Pair]
    ) -> None:
        writes = [
            RecordDelete(s, k, e) if v is None else RecordWrite(s, k, v, "t", e, h) for s, k, v, e, h in batch
        ]
        stored = {pair: version for pair, (version, _) in self.store.records.items()}
        plan = plan_writes(writes, stored, self.missing)
        changed = plan.rows.keys() | plan.deletes
        failed = {pair: StorageError("disk full", key=pair[1]) for pair in failing & changed}
        outcomes = fail_records(plan, failed)

        # Apply the plan as a backend does (deletes first), but not the records that failed.
        for pair in plan.deletes - set(failed):
            assert pair in self.store.records
            del self.store.records[pair]
            self.store.history.pop(pair, None)
        for pair, (w, version) in plan.rows.items():
            if pair in failed:
                continue
            assert (pair in plan.existing) == (pair in self.store.records)
            self.store.records[pair] = (version, w.value)
            change = plan.history.get(pair)
            if change is not None:
                old = self.store.history.get(pair, [])
                kept = old[: change.keep_old]
                self.store.history[pair] = [(v, hw.value) for v, hw in change.added] + kept

        # The model: one write after another; a record that failed keeps its old self.
        before = {
            pair: (self.model.records.get(pair), list(self.model.history.get(pair, []))) for pair in failed
        }
        for w, told in zip(writes, outcomes, strict=True):
            if w.store_id in self.missing:
                assert isinstance(told, StoreNotFoundError)
                continue
            want = self.model.write(w)
            if (w.store_id, w.key) in failed and want.applied:
                assert told is failed[(w.store_id, w.key)]
            else:
                assert told == want
        for pair, (record, history) in before.items():
            if record is None:
                self.model.records.pop(pair, None)
            else:
                self.model.records[pair] = record
            if history:
                self.model.history[pair] = history
            else:
                self.model.history.pop(pair, None)

    @rule(
        reads=st.lists(
            st.tuples(st.sampled_from(STORES), st.sampled_from(KEYS), st.booleans()), min_size=1, max_size=6
        )
    )
    def read_batch(self, reads: list[tuple[str, str, bool]]) -> None:
        requests = [RecordRead(s, k, c) for s, k, c in reads]
        found = {
            pair: StoredRecord(pair[1], value, "t", version, NOW)
            for pair, (version, value) in self.store.records.items()
        }
        results, bumped = plan_reads(requests, found, self.missing)
        for pair, version in bumped.items():
            self.store.records[pair] = (version, self.store.records[pair][1])
        for r, got in zip(requests, results, strict=True):
            pair = (r.store_id, r.key)
            if r.store_id in self.missing:
                assert isinstance(got, StoreNotFoundError)
                continue
            record = self.model.records.get(pair)
            if record is None:
                assert got is None
                continue
            version = record[0] + 1 if r.claim else record[0]
            self.model.records[pair] = (version, record[1])
            assert isinstance(got, StoredRecord)
            assert (got.version, got.value) == (version, record[1])

    @invariant()
    def the_store_holds_what_the_model_holds(self) -> None:
        assert self.store.records == self.model.records
        assert {p: h for p, h in self.store.history.items() if h} == {
            p: h for p, h in self.model.history.items() if h
        }


TestPlanner = PlannerMachine.TestCase
TestPlanner.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# -- batches that expect every version ---------------------------------------------

expected_batch = st.lists(
    st.tuples(st.sampled_from(STORES[:2]), st.sampled_from(KEYS), st.integers(0, 6), st.integers(0, 2)),
    min_size=1,
    max_size=6,
)


@given(batch=expected_batch, expect_none=st.booleans())
def test_expected_outcomes_are_the_planners_when_every_expectation_holds(
    batch: list[tuple[str, str, int, int]], expect_none: bool
) -> None:
    writes = [RecordWrite(s, k, b"v", "t", e, h) for s, k, e, h in batch]
    if expect_none:
        writes[0] = writes[0]._replace(expected_version=None)
    answer = expected_outcomes(writes)
    eligible = all(w.expected_version is not None and w.keep_history == 0 for w in writes) and len(
        {(w.store_id, w.key) for w in writes}
    ) == len(writes)
    assert (answer is not None) == eligible
    if answer is not None:
        stored = {(w.store_id, w.key): w.expected_version for w in writes if w.expected_version}
        assert answer == plan_writes(writes, stored, {}).outcomes


# -- records the medium holds but cannot read ----------------------------------------


def test_an_unreadable_record_is_replaced_as_if_absent_and_deleted_when_asked() -> None:
    """Stored at version 0 (a damaged file): a write expecting 0 replaces it; a delete removes it."""
    unreadable = {("s", "bad"): 0}
    plan = plan_writes([RecordWrite("s", "bad", b"v", "t", 0)], unreadable, {})
    assert plan.outcomes == [WriteOutcome(True, 1)]
    assert plan.rows[("s", "bad")][1] == 1
    plan = plan_writes([RecordDelete("s", "bad"), RecordDelete("s", "bad")], unreadable, {})
    assert plan.outcomes == [WriteOutcome(True, 0), WriteOutcome(False, 0)]
    assert plan.deletes == {("s", "bad")}
    plan = plan_writes([RecordDelete("s", "bad", 3), RecordDelete("s", "absent", 0)], unreadable, {})
    assert plan.outcomes == [WriteOutcome(False, 0), WriteOutcome(False, 0)]
    assert plan.deletes == set()


def test_an_unreadable_record_answers_its_reads_with_its_error_and_is_not_claimed() -> None:
    broken = StorageError("unreadable", key="bad")
    found = {("s", "bad"): broken, ("s", "ok"): StoredRecord("ok", b"v", "t", 4, NOW)}
    reads = [RecordRead("s", "bad", True), RecordRead("s", "ok", True), RecordRead("s", "none", True)]
    results, bumped = plan_reads(reads, found, {})
    assert results[0] is broken
    assert isinstance(results[1], StoredRecord)
    assert results[1].version == 5
    assert results[2] is None
    assert bumped == {("s", "ok"): 5}


def test_a_batch_with_a_delete_takes_no_shortcut() -> None:
    writes = [RecordWrite("s", "a", b"v", "t", 1), RecordDelete("s", "b", 1)]
    assert expected_outcomes(writes) is None


@given(
    reads=st.lists(st.tuples(st.sampled_from(STORES), st.sampled_from(KEYS), st.booleans()), max_size=12),
    stored=st.dictionaries(st.tuples(st.sampled_from(STORES[:2]), st.sampled_from(KEYS)), st.integers(1, 9)),
)
def test_plan_reads_answers_as_claim_reads_over_the_versions(
    reads: list[tuple[str, str, bool]], stored: dict[Pair, int]
) -> None:
    """The two are written apart (one pass over records is the load path); they must never disagree."""
    missing = {"gone": StoreNotFoundError("no such store", store="gone")}
    requests = [RecordRead(*r) for r in reads]
    found = {pair: StoredRecord(pair[1], b"v", "t", version, NOW) for pair, version in stored.items()}
    results, bumped = plan_reads(requests, found, missing)
    answers, claimed = claim_reads(requests, stored, missing)
    assert bumped == claimed
    assert [r.version if isinstance(r, StoredRecord) else r for r in results] == answers
