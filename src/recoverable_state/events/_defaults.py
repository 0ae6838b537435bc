"""The process's default event manager, and managers built from the configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._config import Configuration, configuration_service
from .._services import Service
from ._manager import EventManager


def event_manager_from_configuration(
    config: Configuration, *, factory: Callable[..., EventManager] = EventManager, **overrides: Any
) -> EventManager:
    """A new EventManager (made by `factory`) with `config`'s settings; `overrides` that are not None win."""
    settings: dict[str, Any] = {
        "persist_state_interval": config.persist_state_interval,
        "close_timeout": config.shutdown_timeout,
        "preemption_notice_url": config.preemption_notice_url,
        "preemption_notice_kind": config.preemption_notice_kind,
        "preemption_poll_interval": config.preemption_poll_interval,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return factory(**settings)


default_event_manager: Service[EventManager] = Service(
    "EventManager",
    lambda: event_manager_from_configuration(configuration_service.get(), handle_signals="auto"),
)
"""The manager states listen on when made without `event_manager=`. Entered in the main thread
(a worker written the Crawlee way, `async with service_locator.get_event_manager():` under
`asyncio.run`), it handles SIGTERM, SIGINT and SIGHUP as `run()` does."""
