"""The API reference lists every public name, through the package's front door (not private modules)."""

from __future__ import annotations

import re
from pathlib import Path

import recoverable_state

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_every_public_name_is_in_the_reference_once() -> None:
    listed = re.findall(r"^::: recoverable_state\.(\w+)\s*$", REFERENCE.read_text(encoding="utf-8"), re.M)
    names = [name for name in listed if name != "testing"]
    assert sorted(names) == sorted(recoverable_state.__all__)


def test_the_reference_names_no_private_module() -> None:
    entries = re.findall(r"^::: (\S+)", REFERENCE.read_text(encoding="utf-8"), re.M)
    assert entries and not [e for e in entries if any(part.startswith("_") for part in e.split("."))]
