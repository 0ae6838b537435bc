"""What checksums and encryption cost: persist-all and cold start of N states, with and without them.

    python benchmarks/sealing.py                  # 10,000 states of about 600 B, SQLite, medians of 5
    python benchmarks/sealing.py --n 1000 --repeat 3 --loop trio

Each measurement runs in a fresh interpreter, the three setups interleaved:
`bare` (the record sealing switched off in the child, as records were stored
before checksums), `checksum` (the default: a CRC-32 on every record) and
`encrypted` (a key ring: AES-GCM and the checksum). Cold start is timed from
after the imports to every state's value in hand (constructors,
initialize_many, first current_value); persist-all from the emit to every write
durable. Each is given as wall time and as the CPU time of the worker process
(all its threads), which a busy machine moves less. Targets (issue 25):
checksums at most 5% over `bare`, encryption at most 15%. Nothing here asserts
a time.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETUPS = ("bare", "checksum", "encrypted")
CASES = ("cold", "persist", "cold CPU", "persist CPU")
"""Wall time, and the CPU time of the worker process (all its threads): less moved by a busy machine."""
TARGETS = {"checksum": 1.05, "encrypted": 1.15}
KEYS = "bench:" + base64.b64encode(b"k" * 32).decode()


def child(setup: str, n: int, loop: str, db: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    sys.path.insert(0, str(HERE))
    os.environ["RECOVERABLE_STATE_STORAGE_URL"] = f"sqlite:///{db}"
    crypto_import = 0.0
    if setup == "encrypted":
        os.environ["RECOVERABLE_STATE_ENCRYPTION_KEYS"] = KEYS
        # The library imports `cryptography` when it first builds a key ring; that is an
        # import like the others, so it is made (and timed on its own) before the clock starts.
        began = time.perf_counter()
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401

        crypto_import = time.perf_counter() - began
    import anyio
    from _bench_cases import WorkerState, key_of

    from recoverable_state import Event, EventManager, EventPersistStateData, RecoverableState
    from recoverable_state.storage import _batching

    if setup == "bare":  # records as they were stored before checksums: no sealing at all
        _batching.seal_writes = lambda ops, ring: list(ops)  # type: ignore[assignment]
        _batching.unseal_many = lambda records, ring, stores, label: list(records)  # type: ignore[assignment]

    default = WorkerState(worker_id=0)

    async def run() -> dict[str, Any]:
        async with EventManager(persist_state_interval=3600) as manager:
            began, cpu = time.perf_counter(), time.process_time()
            states = [
                RecoverableState(
                    default_state=default,
                    persist_state_key=key_of(i),
                    persistence_enabled=True,
                    event_manager=manager,
                )
                for i in range(n)
            ]
            await RecoverableState.initialize_many(states)
            values = [state.current_value for state in states]
            cold, cold_cpu = time.perf_counter() - began, time.process_time() - cpu
            for value in values:  # every state changed: a persist-all
                value.processed += 1
            began, cpu = time.perf_counter(), time.process_time()
            manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData())
            await manager.wait_for_all_listeners_to_complete()
            persist, persist_cpu = time.perf_counter() - began, time.process_time() - cpu
            manager.off(event=Event.PERSIST_STATE)
        return {
            "cold": cold,
            "persist": persist,
            "cold CPU": cold_cpu,
            "persist CPU": persist_cpu,
            "crypto_import": crypto_import,
        }

    return anyio.run(run, backend=loop)


def measure(setup: str, n: int, loop: str, db: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", setup, "--n", str(n), "--loop", loop, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{setup}: the child failed:\n{done.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--child", choices=SETUPS)
    parser.add_argument("--db")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.loop, args.db)))
        return
    results: dict[str, dict[str, list[float]]] = {
        s: {case: [] for case in (*CASES, "crypto_import")} for s in SETUPS
    }
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rs-secrets-") as tmp:
        for setup in SETUPS:  # one database per setup, filled (and its records written) by a first run
            measure(setup, args.n, args.loop, Path(tmp) / f"{setup}.sqlite3")
        for _ in range(args.repeat):
            for setup in SETUPS:  # interleaved: the machine's moods spread over all three
                figures = measure(setup, args.n, args.loop, Path(tmp) / f"{setup}.sqlite3")
                for case, seconds in figures.items():
                    results[setup][case].append(seconds)
    print(f"{args.n} states, SQLite, {args.loop}, medians of {args.repeat} fresh processes (ms)")
    print(f"{'case':12} {'bare':>9} {'checksum':>9} {'ratio':>7} {'encrypted':>10} {'ratio':>7}  targets")
    for case in CASES:
        bare, checksum, encrypted = (statistics.median(results[s][case]) for s in SETUPS)
        verdict = " ".join(
            f"{name} {'met' if ratio <= TARGETS[name] else 'MISSED'}"
            for name, ratio in (("checksum", checksum / bare), ("encrypted", encrypted / bare))
        )
        print(
            f"{case:12} {1000 * bare:9.1f} {1000 * checksum:9.1f} {checksum / bare:7.3f} "
            f"{1000 * encrypted:10.1f} {encrypted / bare:7.3f}  {verdict}"
        )
    crypto = statistics.median(results["encrypted"]["crypto_import"])
    print(f"(not in the figures: importing cryptography, once per process, {1000 * crypto:.1f} ms)")
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
