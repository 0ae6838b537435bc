"""The CLI on records kept as snapshot and deltas: show, export, import see whole values; rekey folds them.

The records are written by RecoverableState itself on a file store (a big state,
then a few persists of small changes), as a worker leaves them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import anyio
import pytest
from cli_support import Cli
from pydantic import BaseModel

from recoverable_state import RecoverableState
from recoverable_state.storage import CHAIN_CONTENT_TYPE, KeyValueStore, open_backend

pytestmark = pytest.mark.slow

K1 = "k1:" + base64.b64encode(b"1" * 32).decode()
K2 = "k2:" + base64.b64encode(b"2" * 32).decode()


class Crawl(BaseModel):
    pad: str = "p" * 70_000
    seen: dict[str, int] = {}
    log: list[str] = []


def _fill(url: str, keys: str | None = None) -> Crawl:
    async def main() -> Crawl:
        backend = open_backend(url, encryption_keys=keys)
        try:
            kvs = await KeyValueStore.open(name="default", storage=backend)

            async def factory() -> KeyValueStore:
                return kvs

            state = RecoverableState(
                default_state=Crawl,
                persist_state_key="crawl",
                persistence_enabled="explicit_only",
                persist_state_kvs_factory=factory,
            )
            value = await state.initialize()
            await state.persist_state()
            for n in range(4):
                value.seen[f"u{n}"] = n
                value.log.append(f"line {n}")
                await state.persist_state()
            final = value.model_copy(deep=True)
            await state.teardown()
            record = await kvs.get_record("crawl", chain=True)
            assert record is not None
            assert record.content_type == CHAIN_CONTENT_TYPE  # deltas were written
            return final
        finally:
            await backend.aclose()

    return anyio.run(main)


def _stored_as(url: str, keys: str | None = None) -> str:
    async def main() -> str:
        backend = open_backend(url, encryption_keys=keys)
        try:
            kvs = await KeyValueStore.open(name="default", storage=backend)
            record = await kvs.get_record("crawl", chain=True)
            assert record is not None
            return record.content_type
        finally:
            await backend.aclose()

    return anyio.run(main)


def test_show_export_and_import_see_the_whole_value(cli: Cli, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    expected = json.loads(_fill(url).model_dump_json())
    shown = cli.ok("show", "crawl", url=url)
    assert json.loads(shown)["seen"] == expected["seen"]
    cli.ok("export", "-o", "dump.jsonl", url=url)
    lines = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    exported = next(line for line in lines if line.get("key") == "crawl")
    assert exported["value"] == expected
    assert "vnd.recoverable-state" not in exported["content_type"]
    target = f"file://{tmp_path}/other"
    cli.ok("import", "dump.jsonl", url=target)
    assert _stored_as(target).startswith("application/json")


def test_rekey_writes_a_chain_back_whole_under_the_new_key(cli: Cli, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    expected = json.loads(_fill(url, K1).model_dump_json())
    done = cli("rekey", "--yes", url=url, env={"RECOVERABLE_STATE_ENCRYPTION_KEYS": f"{K2},{K1}"})
    assert done.returncode == 0, done.stderr
    assert _stored_as(url, f"{K2},{K1}") != CHAIN_CONTENT_TYPE
    shown = cli("show", "crawl", url=url, env={"RECOVERABLE_STATE_ENCRYPTION_KEYS": K2})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == expected
