"""Export and import: JSON Lines, byte-exact between any two storages."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_support import Cli, read_all
from cli_worker import ODD_JSON, STATES

pytestmark = pytest.mark.slow


def test_export_writes_one_json_line_per_record_and_nothing_else_to_stdout(cli: Cli, filled_url: str) -> None:
    done = cli("export", url=filled_url)
    assert done.returncode == 0
    *lines, trailer = [json.loads(line) for line in done.stdout.splitlines()]
    assert trailer == {"end": "recoverable-state export", "records": 6}
    by_key = {line["key"]: line for line in lines}
    assert sorted(by_key) == sorted([*STATES, "notes", "blob", "odd-json"])
    assert {line["store"] for line in lines} == {"default"}
    assert by_key["crawler"]["value"]["done"] == 5  # a state: its JSON itself
    assert by_key["notes"]["text"] == "line one\nline two — ünïcode\n"
    assert by_key["odd-json"]["text"].encode() == ODD_JSON  # not compact: its exact text
    assert base64.b64decode(by_key["blob"]["base64"]) == bytes(range(256)) + b"\xff\xfe"
    assert done.stderr == "note: exported 6 records from 1 store to stdout\n"  # no progress bar in a pipe


def test_export_import_round_trip_is_byte_exact_into_another_backend(
    cli: Cli, filled_url: str, other_url: str, tmp_path: Path
) -> None:
    cli.ok("export", "--all", "-o", "dump.jsonl", url=filled_url)
    assert "imported 7 records" in cli.ok("import", "dump.jsonl", url=other_url)

    assert read_all(other_url) == read_all(filled_url)
    cli.ok("export", "--all", "-o", "again.jsonl", url=other_url)
    first = (tmp_path / "dump.jsonl").read_text(encoding="utf-8").splitlines()
    second = (tmp_path / "again.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(second) == sorted(first)


def test_import_into_a_named_store_puts_every_record_there(cli: Cli, filled_url: str, tmp_path: Path) -> None:
    (tmp_path / "other.jsonl").write_bytes(cli.raw("export", "--store", "other", url=filled_url))
    cli.ok("import", "other.jsonl", "--store", "copy", url=filled_url)

    records = read_all(filled_url)
    assert records[("copy", "crawler")] == records[("other", "crawler")]
    assert "copy" in {s["name"] for s in json.loads(cli.ok("stores", "--json", url=filled_url))}


def test_import_writes_large_files_in_batches(cli: Cli, tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {"store": f"s{n % 3}", "key": f"k{n:05}", "content_type": "application/json", "value": [n]}
        )
        for n in range(1234)
    ]
    lines.append(json.dumps({"end": "recoverable-state export", "records": 1234}))
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path}/big.sqlite3"
    cli.ok("import", "big.jsonl", url=url)

    records = read_all(url)
    assert len(records) == 1234
    assert records[("s1", "k01000")] == (b"[1000]", "application/json")


def test_import_of_a_bad_line_names_it_and_imports_nothing(cli: Cli, tmp_path: Path) -> None:
    good = json.dumps({"store": "default", "key": "a", "content_type": "text/plain", "text": "x"})
    (tmp_path / "bad.jsonl").write_text(f'{good}\n{good}\n{{"key": "b"}}\n', encoding="utf-8")
    url = f"sqlite:///{tmp_path}/new.sqlite3"

    done = cli("import", "bad.jsonl", url=url)
    assert done.returncode == 1
    assert done.stderr == 'error: bad.jsonl, line 3: "store" must be a string; nothing was imported\n'
    assert not (tmp_path / "new.sqlite3").exists()


def test_export_to_a_file_leaves_no_file_when_it_fails(cli: Cli, filled_url: str, tmp_path: Path) -> None:
    done = cli("export", "--store", "nope", "-o", "dump.jsonl", url=filled_url)
    assert done.returncode == 1
    assert list(tmp_path.glob("*dump.jsonl*")) == []


# -- a dump that is not whole is refused -------------------------------------

TRAILER_MARK = "recoverable-state export"


def _line(store: str, key: str, text: str) -> str:
    return json.dumps({"store": store, "key": key, "content_type": "text/plain; charset=utf-8", "text": text})


def _write_dump(path: Path, records: list[tuple[str, str, str]], *, trailer: int | None = -1) -> None:
    lines = [_line(*record) for record in records]
    if trailer is not None:
        lines.append(json.dumps({"end": TRAILER_MARK, "records": len(records) if trailer < 0 else trailer}))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_export_ends_with_a_trailer_that_counts_its_records(
    cli: Cli, filled_url: str, tmp_path: Path
) -> None:
    cli.ok("export", "--all", "-o", "dump.jsonl", url=filled_url)
    lines = (tmp_path / "dump.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[-1]) == {"end": TRAILER_MARK, "records": len(lines) - 1}
    assert all("end" not in json.loads(line) for line in lines[:-1])


CUTS = {
    "at a line boundary, the trailer lost": lambda lines: lines[:-1],
    "at a line boundary, records lost": lambda lines: lines[:2] + lines[-1:],
    "in the middle of a line": lambda lines: [*lines[:3], lines[3][: len(lines[3]) // 2]],
    "empty": lambda lines: [],
}


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_import_refuses_a_dump_cut_short_and_imports_nothing(
    cli: Cli, filled_url: str, tmp_path: Path, cut: Any
) -> None:
    cli.ok("export", "--all", "-o", "dump.jsonl", url=filled_url)
    lines = (tmp_path / "dump.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(cut(lines)), encoding="utf-8")
    url = f"sqlite:///{tmp_path}/new.sqlite3"

    done = cli("import", "cut.jsonl", url=url)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: cut.jsonl")
    assert done.stderr.rstrip().endswith("nothing was imported")
    assert not (tmp_path / "new.sqlite3").exists()


def test_import_names_the_counts_when_the_trailer_disagrees(cli: Cli, tmp_path: Path) -> None:
    _write_dump(tmp_path / "d.jsonl", [("s", "a", "x"), ("s", "b", "y")], trailer=3)
    done = cli("import", "d.jsonl", url=f"sqlite:///{tmp_path}/new.sqlite3")
    assert done.stderr == (
        "error: d.jsonl holds 2 records but its trailer line says 3: it is not whole; nothing was imported\n"
    )


def test_import_from_stdin_is_checked_whole_before_anything_is_written(cli: Cli, tmp_path: Path) -> None:
    _write_dump(tmp_path / "d.jsonl", [("s", "a", "x"), ("s", "b", "y")], trailer=None)
    url = f"sqlite:///{tmp_path}/new.sqlite3"
    done = cli("import", "-", url=url, input=(tmp_path / "d.jsonl").read_text(encoding="utf-8"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: stdin ends without the trailer line")
    assert not (tmp_path / "new.sqlite3").exists()

    _write_dump(tmp_path / "d.jsonl", [("s", "a", "x"), ("s", "b", "y")])
    assert "imported 2 records" in cli.ok("import", "-", url=url, input=(tmp_path / "d.jsonl").read_text())
    text = "text/plain; charset=utf-8"
    assert read_all(url) == {("s", "a"): (b"x", text), ("s", "b"): (b"y", text)}


def test_export_all_of_a_file_root_that_does_not_exist_is_an_error(cli: Cli, tmp_path: Path) -> None:
    done = cli("export", "--all", "-o", "dump.jsonl", url=f"file://{tmp_path}/nowhere")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: there is no file store root at '{tmp_path}/nowhere'")
    assert not (tmp_path / "nowhere").exists()
    assert list(tmp_path.glob("*dump.jsonl*")) == []


# -- an import that fails part way says what it wrote --------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (as root), to fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_an_import_onto_a_full_disk_says_exactly_what_it_wrote(
    cli: Cli, tmp_path: Path, small_disk: Path, kind: str
) -> None:
    small = [("a", f"a{n}", "small") for n in range(3)]  # lines 1-3
    big = [("b", f"b{n}", "x" * 400_000) for n in range(4)]  # lines 4-7: 1.6 MB on a 1 MiB disk
    after = [("c", "c0", "small")]  # line 8
    _write_dump(tmp_path / "d.jsonl", small + big + after)
    url = f"sqlite:///{small_disk}/state.sqlite3" if kind == "sqlite" else f"file://{small_disk}/files"

    done = cli("import", "d.jsonl", url=url)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    message = done.stderr
    assert "imported 3 records before that, every one on lines 1-3 ('a': 3)" in message
    assert "Importing the file again is safe" in message

    stored = read_all(url)
    assert {k for k in stored if k[0] == "a"} == {("a", key) for _, key, _ in small}
    assert ("c", "c0") not in stored  # nothing after the failure
    written = re.search(r"lines ([\d, -]+) were written", message)
    written_lines = set() if written is None else _numbers(written.group(1))
    assert "were not" in message or "none of lines 4-7 was written" in message
    assert {k for k in stored if k[0] == "b"} == {("b", big[n - 4][1]) for n in written_lines}
    for key, (value, _) in stored.items():
        if key[0] == "b":
            assert value == b"x" * 400_000  # whole, never torn


def _numbers(ranges: str) -> set[int]:
    found = set()
    for part in ranges.split(", "):
        first, _, last = part.partition("-")
        found.update(range(int(first), int(last or first) + 1))
    return found


# -- memory stays flat whatever the store's size ------------------------------

MEASURED = """
import atexit, resource, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
sys.argv[0] = "recoverable-state"
runpy.run_module("recoverable_state.cli", run_name="__main__")
"""


def _peak_kib(tmp_path: Path, url: str, *args: str) -> int:
    """Run the CLI and return its peak resident memory, in KiB."""
    report = tmp_path / "peak.txt"
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, str(report), "--storage-url", url, *args],
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return int(report.read_text())


def test_export_and_import_stream_so_memory_stays_flat(tmp_path: Path) -> None:
    mib = 1024 * 1024
    records = 96
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as out:
        for n in range(records):
            out.write(_line("big", f"k{n:03}", chr(ord("a") + n % 26) * mib) + "\n")
        out.write(json.dumps({"end": TRAILER_MARK, "records": records}) + "\n")
    url = f"sqlite:///{tmp_path}/big.sqlite3"

    imported = _peak_kib(tmp_path, url, "import", "big.jsonl")
    exported = _peak_kib(tmp_path, url, "export", "--all", "-o", "again.jsonl")
    baseline = _peak_kib(tmp_path, url, "list", "-s", "big")  # the interpreter and its imports

    data_kib = records * mib // 1024
    assert imported - baseline < data_kib // 2, (imported, baseline)
    assert exported - baseline < data_kib // 2, (exported, baseline)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "big.jsonl").read_bytes()
