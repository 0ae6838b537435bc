"""benchmarks/fleet.py --smoke: every setup runs, every persist succeeds, the table prints.

About 30 s on the 2-core development machine (the servers of five setups are started
and stopped). Timings are not checked: only that the script works end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUPS = ("sqlite", "postgres", "pgbouncer", "redis", "redis-cluster")


@pytest.mark.slow
def test_the_smoke_mode_runs_every_setup_and_every_persist_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker us/state" in done.stdout
    assert "load average" in done.stdout
    results = json.loads(out.read_text())
    assert {r["setup"] for r in results} == set(SETUPS)
    unavailable = [f"{r['setup']}: {r['unavailable']}" for r in results if r["unavailable"]]
    if os.environ.get("CI"):
        assert not unavailable
    ran = [r for r in results if not r["unavailable"]]
    assert ran, unavailable
    for r in ran:
        assert r["failures"] == [], (r["setup"], r["k"], r["failures"])
        assert r["writes_per_s"] > 0
        assert r["worker_us_per_state"] > 0
        assert r["k"] in (1, 2)
        if r["setup"] != "sqlite":
            assert r["server_us_per_state"] is not None
    assert [r["k"] for r in ran if r["setup"] == "sqlite"] in ([], [1])
