"""The record contract, written once: what a batch of requests does to a store.

A backend fetches what these functions need (the stored versions of the
batch's keys, which stores are missing), hands it to them, and applies their
answer in its own medium, in one transaction where it has one. The rules live
here and nowhere else: `TransactionalBackend` calls them for the backends built
on it; Redis, which must decide inside its server for atomicity, runs the same
rules in Lua and the conformance suite checks its answers against these.

The rules:

- A write with `expected_version=None` applies whatever is stored; with 0 only
  when the key is absent; with n only when the stored version is n. An applied
  write stores version `stored + 1` (1 for a new key).
- A delete applies when the record exists and, if a version is expected, is at
  that version: it removes the record and its history and answers
  `WriteOutcome(True, 0)`; otherwise it answers `WriteOutcome(False, stored)`
  (`stored` is 0 for an absent record).
- Requests of one batch act one after another, in order: a second write to a
  key sees the first; a write after a delete creates the record afresh.
- A read with `claim` bumps the version of a record it finds (fencing: a
  process still holding the older version can no longer write).
- A request to a missing store fails alone, answered with its error in place.
- History keeps, per key, the newest `keep_history` snapshots written with
  history; each such write keeps its own snapshot and trims to its own count.
  A claim bumps the version without a snapshot; a delete drops them all.
- An append applies only to a record at its expected version: it keeps its
  delta after the record's snapshot and stores the next version. A write drops
  the deltas kept before it (a write then an append in one batch keeps that
  append), a delete drops them with the record; a claim keeps them.
- A record the medium holds but cannot read (a damaged file) is stored at
  version 0: a write replaces it as if it were absent, and a delete (expecting
  nothing, or 0) removes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import attrgetter
from typing import NamedTuple, TypeVar

from .._errors import StorageError
from ._backend import RecordAppend, RecordDelete, RecordRead, RecordWrite, StoredRecord, WriteOp, WriteOutcome

T = TypeVar("T")

Pair = tuple[str, str]
"""A record's place: (store id, key)."""

_expected_version = attrgetter("expected_version")
_keep_history = attrgetter("keep_history")

BATCH_BYTES = 64 * 1024 * 1024
"""Values of one statement or script call at most (Redis blocks while a script runs;
a PostgreSQL array parameter must stay under 1 GB)."""


class HistoryPlan(NamedTuple):
    """What a batch does to one key's kept snapshots."""

    added: list[tuple[int, RecordWrite]]
    """New snapshots to keep, newest first, as (version, write)."""
    keep_old: int
    """How many of the snapshots kept before the batch survive, newest first."""

    @property
    def keep_total(self) -> int:
        """How many snapshots the key keeps after the batch, newest first."""
        return self.keep_old + len(self.added)


class WritePlan(NamedTuple):
    """The answer to a batch of writes, before it is applied."""

    outcomes: list[WriteOutcome | StorageError]
    """One per write, in order."""
    rows: dict[Pair, tuple[RecordWrite, int]]
    """The final content of each record the batch leaves written: (last applied write, its version)."""
    existing: set[Pair]
    """The records of `rows` that exist before them (updates, not inserts: none of `deletes`)."""
    history: dict[Pair, HistoryPlan]
    """The history change of each key written with history."""
    applied: dict[Pair, list[int]]
    """The positions of the applied requests of each record (to fail them if it cannot be stored)."""
    deletes: set[Pair]
    """The stored records the batch deletes, with their history, before `rows` are applied
    (a record deleted, then written again, is in both)."""
    appends: dict[Pair, list[tuple[int, RecordAppend]]]
    """The deltas each record keeps after `rows` are applied, in order, each with the version
    it makes. Where a record has appends, its version after the batch is the last one's; the
    deltas stored before the batch stay unless the record is in `rows` or `deletes`."""

    def final_version(self, pair: Pair) -> int:
        """The version a record of `rows` or `appends` is stored at after the batch."""
        added = self.appends.get(pair)
        return added[-1][0] if added else self.rows[pair][1]


def compare_and_set(expected: int | None, stored: int) -> bool:
    """Whether a write or delete expecting `expected` applies to a record at `stored` (0: absent)."""
    return expected is None or expected == stored


def plan_writes(
    ops: Sequence[WriteOp],
    stored: Mapping[Pair, int],
    missing: Mapping[str, StorageError],
) -> WritePlan:
    """Decide each write and delete of a batch from the stored versions of its records.

    `stored` holds the version of each record of the batch that exists (a
    record the medium cannot read at 0, see the module docstring); `missing`
    an error for each store of the batch that does not exist.
    """
    outcomes: list[WriteOutcome | StorageError] = []
    current = dict(stored)
    rows: dict[Pair, tuple[RecordWrite, int]] = {}
    history: dict[Pair, HistoryPlan] = {}
    applied: dict[Pair, list[int]] = {}
    deletes: set[Pair] = set()
    appends: dict[Pair, list[tuple[int, RecordAppend]]] = {}
    for i, w in enumerate(ops):
        if missing and w.store_id in missing:
            outcomes.append(missing[w.store_id])
            continue
        pair = (w.store_id, w.key)
        version = current.get(pair, 0)
        if w.expected_version is not None and w.expected_version != version:
            outcomes.append(WriteOutcome(False, version))
            continue
        if isinstance(w, RecordAppend):
            if pair not in current or version == 0 or w.expected_version is None:
                outcomes.append(WriteOutcome(False, version))
                continue
            version += 1
            current[pair] = version
            appends.setdefault(pair, []).append((version, w))
            outcomes.append(WriteOutcome(True, version))
            applied.setdefault(pair, []).append(i)
            continue
        if isinstance(w, RecordDelete):
            if pair not in current:
                outcomes.append(WriteOutcome(False, 0))
                continue
            del current[pair]
            rows.pop(pair, None)
            history.pop(pair, None)
            appends.pop(pair, None)
            if pair in stored:
                deletes.add(pair)
            outcomes.append(WriteOutcome(True, 0))
            applied.setdefault(pair, []).append(i)
            continue
        version += 1
        current[pair] = version
        rows[pair] = (w, version)
        appends.pop(pair, None)
        outcomes.append(WriteOutcome(True, version))
        applied.setdefault(pair, []).append(i)
        if w.keep_history > 0:
            history[pair] = _keep(history.get(pair), version, w, pair in deletes)
    existing = {pair for pair in rows if pair in stored and pair not in deletes}
    return WritePlan(outcomes, rows, existing, history, applied, deletes, appends)


def _keep(plan: HistoryPlan | None, version: int, w: RecordWrite, wiped: bool) -> HistoryPlan:
    """A key's history change after one more write that keeps history (`wiped`: deleted in the batch)."""
    added = [(version, w), *(plan.added if plan else ())][: w.keep_history]
    room = w.keep_history - len(added)  # never below 0: `added` is cut to keep_history
    if wiped:
        return HistoryPlan(added, 0)
    return HistoryPlan(added, room if plan is None else min(plan.keep_old, room))


def expected_outcomes(writes: Sequence[WriteOp]) -> list[WriteOutcome] | None:
    """The outcomes of a batch in which every write finds the version it expects.

    Defined only for a batch of writes (no delete) that all expect a version, each
    to a key of its own, keeping no history (None otherwise). For such a batch a
    backend may apply every write as a conditional update, count that each
    condition held, and fall back to `plan_writes` when one did not: the answer is
    then the same, without reading the stored versions first.
    """
    versions = list(map(_expected_version, writes))
    try:
        if None in versions or any(map(_keep_history, writes)):
            return None
    except AttributeError:  # a delete or an append has no keep_history: cheaper than a look at each type
        return None
    # Distinct keys make distinct pairs. A comprehension, not set(map(...)): one C call over
    # 100,000 writes would hold the GIL, and so the event loop, for 13 ms.
    n = len(writes)
    if len({w.key for w in writes}) != n and len({(w.store_id, w.key) for w in writes}) != n:
        return None
    # Shared, as they are immutable: most writes of a batch reach one version.
    made = {expected: WriteOutcome(True, expected + 1) for expected in set(versions)}
    return list(map(made.__getitem__, versions))


def fail_records(plan: WritePlan, failed: Mapping[Pair, StorageError]) -> list[WriteOutcome | StorageError]:
    """The outcomes of a plan whose records in `failed` could not be stored.

    Every applied write of such a record is answered with its error (nothing of
    it landed); the other records' outcomes stand as planned.
    """
    outcomes = list(plan.outcomes)
    for pair, error in failed.items():
        for i in plan.applied.get(pair, ()):
            outcomes[i] = error
    return outcomes


def claim_reads(
    reads: Sequence[RecordRead],
    versions: Mapping[Pair, int],
    missing: Mapping[str, StorageError],
) -> tuple[list[int | StorageError | None], dict[Pair, int]]:
    """The version each read answers with, from the stored versions; and each claimed record's new one.

    A read answers None for an absent record and its store's error for a missing
    store. Claims act one after another: two claims of one key in a batch bump it twice.
    """
    answers: list[int | StorageError | None] = []
    bumped: dict[Pair, int] = {}
    for r in reads:
        if missing and r.store_id in missing:
            answers.append(missing[r.store_id])
            continue
        pair = (r.store_id, r.key)
        version = versions.get(pair)
        if version is not None:
            if r.claim:
                version = bumped[pair] = bumped.get(pair, version) + 1
            elif pair in bumped:
                version = bumped[pair]
        answers.append(version)
    return answers, bumped


def plan_reads(
    reads: Sequence[RecordRead],
    found: Mapping[Pair, StoredRecord | StorageError],
    missing: Mapping[str, StorageError],
) -> tuple[list[StoredRecord | StorageError | None], dict[Pair, int]]:
    """Answer a batch of reads from the records found, and the new version of each claimed one.

    `claim_reads` over the records' versions (the test suite holds the two to one
    answer), in one pass: a batch of 10,000 claims is every state's load. A record
    found as an error (one the medium holds but cannot read) answers each of its
    reads with that error, and is not claimed.
    """
    results: list[StoredRecord | StorageError | None] = []
    bumped: dict[Pair, int] = {}
    new = _new_record
    for store_id, key, claim in reads:
        if missing and store_id in missing:
            results.append(missing[store_id])
            continue
        pair = (store_id, key)
        record = found.get(pair)
        if record is None or isinstance(record, StorageError):
            results.append(record)
            continue
        if claim:
            version = bumped[pair] = bumped.get(pair, record[3]) + 1
        elif pair in bumped:
            version = bumped[pair]
        else:
            results.append(record)
            continue
        name, value, content_type, _, updated_at = record  # built whole: _replace costs four times as much
        results.append(new(StoredRecord, (name, value, content_type, version, updated_at)))
    return results, bumped


_new_record = tuple.__new__
"""Builds a record from its fields: the NamedTuple's own constructor is Python code (twice the time)."""


def by_store(pairs: Iterator[Pair] | Sequence[Pair]) -> dict[str, list[str]]:
    """The distinct keys of `pairs`, grouped by store, in first-seen order."""
    keys: dict[str, list[str]] = {}
    for store_id, key in dict.fromkeys(pairs):
        keys.setdefault(store_id, []).append(key)
    return keys


def split_by_size(items: Sequence[T], size: Callable[[T], int]) -> list[list[T]]:
    """`items` in order, cut into runs whose sizes add up to at most BATCH_BYTES (one item at least)."""
    limit = BATCH_BYTES
    runs: list[list[T]] = [[]]
    total = 0
    for item in items:
        n = size(item)
        if runs[-1] and total + n > limit:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += n
    return runs
