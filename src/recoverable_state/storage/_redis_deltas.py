"""The Redis backends' side of deltas: what a read of a record with deltas answers.

The scripts (`_redis_scripts.py`) keep a record's deltas in its own hash and
answer such a record with its pieces as a flat list; both the single-server and
the cluster backend turn that list into one chain here, so that they answer alike.
"""

from __future__ import annotations

from typing import Any

from ._chain import CHAIN_CONTENT_TYPE, pack_chain

__all__ = ["CHAIN_CONTENT_TYPE", "chain_of"]


def chain_of(pieces: list[Any]) -> bytes:
    """One chain from the script's flat list: snapshot, its content type, then each delta and its own."""
    return pack_chain([(pieces[i], pieces[i + 1].decode("utf-8")) for i in range(0, len(pieces), 2)])
