"""A worker without a model: its progress is a plain dict from `use_state`.

Run it, stop it with Ctrl-C whenever you like, run it again: it resumes. The
dict is loaded once, and every change to it is saved on the timer, on Ctrl-C or
SIGTERM, and when the worker ends. Its state lives in ./storage/state.sqlite3
(set RECOVERABLE_STATE_STORAGE_URL to keep it elsewhere).

    python examples/use_state_worker.py --pages 10
"""

from __future__ import annotations

import argparse

import anyio

import recoverable_state
from recoverable_state import use_state


async def main(pages: int, delay: float) -> None:
    progress = await use_state("crawl-progress", {"next_page": 1, "titles": []})
    if progress["titles"]:
        print(f"resuming at page {progress['next_page']}", flush=True)
    else:
        print("starting from scratch", flush=True)
    last = progress["next_page"] + pages
    while progress["next_page"] < last:
        await anyio.sleep(delay)  # the "work"
        page = progress["next_page"]
        progress["titles"].append(f"title of page {page}")
        progress["next_page"] = page + 1
        print(f"crawled page {page}", flush=True)
    # The same object on every call: nothing to pass around.
    assert await use_state("crawl-progress") is progress
    print(f"done for now: {len(progress['titles'])} pages in total; run me again to go on", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=10, help="pages to crawl this run")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds of work per page")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    # run(): the event manager saves on a timer and on SIGTERM/Ctrl-C, and once more at the end.
    recoverable_state.run(main, args.pages, args.delay, backend=args.backend, persist_state_interval=2)
