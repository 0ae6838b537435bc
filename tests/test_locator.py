"""service_locator: defaults built from the configuration, and no silent replacement."""

from __future__ import annotations

import pytest

from recoverable_state import (
    Configuration,
    EventManager,
    RecoverableStateError,
    ServiceConflictError,
    service_locator,
)
from recoverable_state.storage import MemoryBackend


def test_setting_another_event_manager_after_one_was_handed_out_raises() -> None:
    handed_out = service_locator.get_event_manager()
    with pytest.raises(ServiceConflictError, match=r"EventManager is already in use\."):
        service_locator.set_event_manager(EventManager())
    assert service_locator.get_event_manager() is handed_out
    service_locator.set_event_manager(handed_out)  # the same object is fine


def test_setting_another_storage_after_one_was_handed_out_raises() -> None:
    first = MemoryBackend()
    service_locator.set_storage(first)
    service_locator.set_storage(first)
    assert service_locator.get_storage() is first
    with pytest.raises(ServiceConflictError, match=r"StorageClient is already in use\."):
        service_locator.set_storage(MemoryBackend())
    service_locator.set_storage(first)


def test_setting_another_configuration_after_one_was_handed_out_raises() -> None:
    config = service_locator.get_configuration()
    with pytest.raises(ServiceConflictError, match=r"Configuration is already in use\."):
        service_locator.set_configuration(Configuration(storage_url="memory://"))
    service_locator.set_configuration(config)


def test_setting_a_second_service_raises_even_before_the_first_was_used() -> None:
    manager = EventManager()
    service_locator.set_event_manager(manager)
    with pytest.raises(ServiceConflictError, match=r"EventManager is already in use\."):
        service_locator.set_event_manager(EventManager())  # as Crawlee: whoever set first wins
    assert service_locator.get_event_manager() is manager
    service_locator.reset()
    assert service_locator.get_event_manager() is not manager
    service_locator.reset()
    service_locator.set_event_manager(manager)
    assert service_locator.get_event_manager() is manager


def test_service_conflict_error_is_a_library_error() -> None:
    assert issubclass(ServiceConflictError, RecoverableStateError)


def test_the_default_event_manager_is_built_from_the_configuration() -> None:
    service_locator.set_configuration(
        Configuration(persist_state_interval=3, shutdown_timeout=4, preemption_notice_url="aws")
    )
    manager = service_locator.get_event_manager()
    assert manager.persist_state_interval.total_seconds() == 3
    assert manager.close_timeout.total_seconds() == 4
    assert manager.preemption_notice_url is not None


def test_the_events_package_does_not_import_the_locator() -> None:
    import ast
    from pathlib import Path

    import recoverable_state.events as events

    for module in Path(events.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("_locator", "recoverable_state._locator"), module.name
