"""The storage conformance suite: the record contract, as pytest tests any backend runs with one import.

Subclass `BackendConformance` in a test module and give it a `make_backend`
fixture: a callable that opens a backend over this test's data, which starts
empty; each call opens another backend over the same data (a restart, or a
second process). Set the capability flags your backend lacks to False::

    import pytest
    from recoverable_state.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        shared = False   # two instances at once do not see each other

        @pytest.fixture
        def make_backend(self, tmp_path):
            return lambda: MyBackend(tmp_path / "data")

Every async check runs on asyncio and on trio (where trio is installed). The
checks use pytest, the anyio pytest plugin (installed with anyio) and
hypothesis: test-time dependencies, which importing this module needs.
Import `BackendConformance` from `recoverable_state.testing` so that pytest
rewrites the suite's asserts (their failures then show the values compared).
"""

from __future__ import annotations

from ._suite import MakeBackend
from ._suite_batches import BatchChecks
from ._suite_deltas import DeltaChecks
from ._suite_instances import InstanceChecks
from ._suite_machine import MachineChecks, RecordMachine
from ._suite_model import ModelChecks, check_random_batches
from ._suite_records import RecordChecks
from ._suite_stores import StoreChecks

__all__ = ["BackendConformance", "MakeBackend", "RecordMachine", "check_random_batches"]


class BackendConformance(
    RecordChecks, BatchChecks, DeltaChecks, ModelChecks, StoreChecks, InstanceChecks, MachineChecks
):
    """Every conformance check of a storage backend; subclass it with a `make_backend` fixture.

    Capability flags (class attributes, True unless set otherwise):

    - `keeps_history`: the backend keeps earlier snapshots (`keep_history`).
    - `durable`: data survives closing the backend and opening another over it.
    - `shared`: backends open at once over the same data (as two processes)
      see each other's writes and claims.
    - `large_values`: records of several MiB are stored.

    The delta checks run when the backend's own `keeps_deltas` is True.
    - `machine_examples`: how many random runs the stateful check makes (20).

    Fixtures it provides: `backend` (opened with `make_backend`, closed after the
    test), `open_more` (opens more backends over the same data, all closed after
    the test) and `anyio_backend` (asyncio and trio).
    """
