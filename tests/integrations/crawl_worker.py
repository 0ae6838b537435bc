"""A Crawlee crawl whose pages are counted in a RecoverableState, both persisting on one CrawleeEventManager.

Started by test_crawlee_crawl.py as `python crawl_worker.py START_URL [--under-run]`. It prints
`resumed N` once its state is loaded, `counted N URL` for each page it counts,
`skipped URL` for a page it had counted already (crawled again after a restart),
and `done` when the crawl ends. SIGTERM persists both frameworks' states and
exits 143 (the manager handles signals, as run() does); the crawler is stopped
as Crawlee stops it (run_crawler), so its request queue can resume.
"""

from __future__ import annotations

import re
import sys

import anyio
from crawlee import ConcurrencySettings
from crawlee import service_locator as crawlee_services
from crawlee.crawlers import HttpCrawler, HttpCrawlingContext
from pydantic import BaseModel

import recoverable_state
from recoverable_state import RecoverableState, service_locator
from recoverable_state.integrations.crawlee import CrawleeEventManager


class Pages(BaseModel):
    counted: list[str] = []
    """The URLs counted, in order; a URL is never counted twice."""


async def main(start_url: str, events: CrawleeEventManager | None = None) -> None:
    if events is None:  # under run(): the manager it made
        made = service_locator.get_event_manager()
        assert isinstance(made, CrawleeEventManager), made
        events = made
    crawlee_services.set_event_manager(events)  # before any Crawlee component asks for one
    crawler = HttpCrawler(
        concurrency_settings=ConcurrencySettings(max_concurrency=4, desired_concurrency=4),
        configure_logging=False,
    )
    async with (
        events,
        RecoverableState(
            default_state=Pages(), persist_state_key="pages", persistence_enabled=True, event_manager=events
        ) as pages,
    ):
        seen = set(pages.counted)
        print(f"resumed {len(pages.counted)}", flush=True)

        @crawler.router.default_handler
        async def count_page(context: HttpCrawlingContext) -> None:
            url = context.request.url
            body = (await context.http_response.read()).decode()
            if url in seen:  # handled before the restart, not yet marked handled in the queue
                print(f"skipped {url}", flush=True)
            else:
                seen.add(url)
                pages.counted.append(url)
                print(f"counted {len(pages.counted)} {url}", flush=True)
            await context.add_requests(re.findall(r'href="([^"]+)"', body))

        await events.run_crawler(crawler, [start_url])
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[2:] == ["--under-run"]:  # needs run() to build its manager with a factory (not yet)
        recoverable_state.run(main, sys.argv[1], close_timeout=10, event_manager_factory=CrawleeEventManager)  # type: ignore[call-arg]
    else:
        events = CrawleeEventManager(handle_signals=True, close_timeout=10)
        anyio.run(main, sys.argv[1], events, backend="asyncio")  # Crawlee runs on asyncio only
