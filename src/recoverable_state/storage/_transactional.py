"""TransactionalBackend: `read_batch` and `write_batch` written once, over a medium's transactions.

A backend whose medium runs a function in one transaction (a database, a locked
directory, a dict between two awaits) provides a few primitives; the batch
methods here fetch what the record contract needs, ask the planner
(`_contract.py`), and hand its answer back to the backend to apply. No backend
on this base decides a compare-and-set, a claim or a delete on its own.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Generic, TypeVar, cast

from .._errors import StorageError
from ._backend import RecordRead, RecordWrite, StorageBackend, StoredRecord, WriteOp, WriteOutcome
from ._contract import Pair, WritePlan, expected_outcomes, fail_records, plan_reads, plan_writes

T = TypeVar("T")
TTxn = TypeVar("TTxn")


class TransactionalBackend(StorageBackend, Generic[TTxn]):
    """A backend over a medium with transactions: it applies, the shared layer decides.

    Implement `run_transaction` and the primitives below it (each is called inside
    one transaction, with the handle `run_transaction` gives), plus the store and
    listing methods of `StorageBackend`. `read_batch` and `write_batch` are
    written here, once, for every such backend::

        write_batch(ops):  in one transaction (write=True):
            [apply_expected(txn, ops) when expected_outcomes(ops) answers: done if True]
            missing, stored = find_versions(txn, store ids, pairs)
            plan = plan_writes(ops, stored, missing)
            failed = apply_plan(txn, plan)        # records it could not store
            -> fail_records(plan, failed)

        read_batch(reads): in one transaction (write = any read claims):
            missing, found = find_records(txn, store ids, pairs)
            answers, claimed = plan_reads(reads, found, missing)
            store_claims(txn, claimed)            # when there are claims
            -> answers

    A function handed to `run_transaction` may be run more than once (a medium
    that retries a transaction runs it again from the start); it changes nothing
    outside the transaction.
    """

    @abstractmethod
    async def run_transaction(self, fn: Callable[[TTxn], T], *, write: bool, store_ids: Set[str]) -> T:
        """Run `fn(txn)` in one transaction of the medium (in a worker thread for a blocking driver).

        With `write`, the transaction may change the medium and commits durably
        before this returns; an exception from `fn` rolls it back and is raised.
        `store_ids` are the stores the transaction concerns (to lock them, to
        name them in messages).
        """

    @abstractmethod
    def find_records(
        self, txn: TTxn, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[Mapping[str, StorageError], Mapping[Pair, StoredRecord | StorageError]]:
        """Which of `store_ids` are missing (an error for each), and the stored record of each pair.

        Only pairs that exist appear (a pair may be asked for twice); a record the
        medium holds but cannot read appears as its error (RecordCorruptError).
        """

    def find_versions(
        self, txn: TTxn, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[Mapping[str, StorageError], Mapping[Pair, int]]:
        """Which of `store_ids` are missing (an error for each), and the stored version of each pair.

        Only pairs that exist appear in the versions (a pair may be asked for twice);
        a record the medium holds but cannot read appears at version 0. A medium
        with row locks locks the pairs here, until the transaction ends. This
        default takes the versions of `find_records`; override it where reading
        whole records costs more than their versions.
        """
        missing, found = self.find_records(txn, store_ids, pairs)
        return missing, {
            pair: 0 if isinstance(record, StorageError) else record.version for pair, record in found.items()
        }

    @abstractmethod
    def store_claims(self, txn: TTxn, claimed: Mapping[Pair, int]) -> None:
        """Set the version of each claimed record (found by `find_records` in this transaction)."""

    @abstractmethod
    def apply_plan(self, txn: TTxn, plan: WritePlan) -> Mapping[Pair, StorageError]:
        """Apply the planner's answer: first `plan.deletes`, then `plan.rows` and `plan.history`.

        Answers the records it could not store (a full disk), each with its error,
        having changed nothing of them; an empty mapping when everything landed.
        A medium whose transaction is all or nothing raises instead.
        """

    def apply_expected(self, txn: TTxn, writes: Sequence[RecordWrite]) -> bool:
        """Optional fast path: apply a batch `expected_outcomes` answers, as conditional updates.

        True when every store exists and every write found its expected version
        (all are then applied); False, having changed nothing, otherwise. This
        default always answers False, and the batch is planned from the stored
        versions.
        """
        return False

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        claims = any(r.claim for r in reads)
        store_ids = {r.store_id for r in reads}

        def read(txn: TTxn) -> list[StoredRecord | StorageError | None]:
            missing, found = self.find_records(txn, store_ids, [(r.store_id, r.key) for r in reads])
            results, claimed = plan_reads(reads, found, missing)
            if claimed:
                self.store_claims(txn, claimed)
            return results

        return await self.run_transaction(read, write=claims, store_ids=store_ids)

    async def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
        store_ids = {w.store_id for w in ops}
        fast = type(self).apply_expected is not TransactionalBackend.apply_expected  # else no use asking

        def write(txn: TTxn) -> list[WriteOutcome | StorageError]:
            expected = expected_outcomes(ops) if fast else None
            if expected is not None and self.apply_expected(txn, cast("Sequence[RecordWrite]", ops)):
                return list(expected)
            missing, stored = self.find_versions(txn, store_ids, [(w.store_id, w.key) for w in ops])
            plan = plan_writes(ops, stored, missing)
            failed = self.apply_plan(txn, plan)
            return fail_records(plan, failed) if failed else plan.outcomes

        return await self.run_transaction(write, write=True, store_ids=store_ids)
