"""Tools for testing workers and storage backends.

- `FaultInjectingBackend`: wraps any backend and fails, delays or hangs chosen
  batches on purpose, to check that what every caller was told is what the
  store holds.
- `BackendConformance` (in `recoverable_state.testing.conformance`): the record
  contract as a pytest suite; a package proves its backend by subclassing it
  in one test module::

      from recoverable_state.testing import BackendConformance

      class TestMyBackend(BackendConformance):
          @pytest.fixture
          def make_backend(self, tmp_path):
              return lambda: MyBackend(tmp_path / "data")

The conformance suite needs pytest and hypothesis (test-time dependencies); it
is imported only when asked for, so this package imports without them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ._faults import FaultInjectingBackend

if TYPE_CHECKING:
    from .conformance import BackendConformance

__all__ = ["BackendConformance", "FaultInjectingBackend"]

_SUITE = (
    "conformance",
    "_suite",
    "_suite_batches",
    "_suite_instances",
    "_suite_machine",
    "_suite_model",
    "_suite_records",
    "_suite_stores",
)
"""The modules of the conformance suite (pytest rewrites the asserts of each)."""


def __getattr__(name: str) -> Any:
    if name != "BackendConformance":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if "pytest" in sys.modules:  # under pytest: the suite's asserts then explain themselves when they fail
        import pytest

        pytest.register_assert_rewrite(*(f"{__name__}.{module}" for module in _SUITE))
    from .conformance import BackendConformance

    return BackendConformance
