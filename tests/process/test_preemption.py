"""Preemption notices: the poller against a fake metadata service on 127.0.0.1.

A notice makes the manager emit MIGRATING once, which persists every state with
`is_migrating=True`; no notice emits nothing; failed polls are retried. Also: a
MIGRATING the user emits persists the same way. On asyncio and trio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest
from fake_metadata import AWS_PATH, GCP_PATH, TOKEN, FakeMetadata
from pydantic import BaseModel

from recoverable_state import (
    Event,
    EventManager,
    EventMigratingData,
    EventPersistStateData,
    KeyValueStore,
    RecoverableState,
    service_locator,
)
from recoverable_state.events import (
    AWS_SPOT_NOTICE_URL,
    GCP_PREEMPTED_URL,
    PreemptionNoticePoller,
)

pytestmark = pytest.mark.anyio

POLL = timedelta(milliseconds=50)
HOUR = timedelta(hours=1)
FIRST_TICK = EventPersistStateData(is_migrating=False)
"""The first timer tick: it comes as the manager's sources start, after a Recorder registered."""


class Job(BaseModel):
    done: int = 0
    name: str = ""


class Recorder:
    """Records what MIGRATING and PERSIST_STATE listeners of a manager receive."""

    def __init__(self, manager: EventManager) -> None:
        self.migrating: list[EventMigratingData] = []
        self.persists: list[EventPersistStateData] = []
        manager.on(event=Event.MIGRATING, listener=self.migrating.append)
        manager.on(event=Event.PERSIST_STATE, listener=self.persists.append)

    async def wait_for_migrating(self) -> None:
        await eventually(lambda: bool(self.migrating))


async def start_states(manager: EventManager, count: int = 20) -> list[RecoverableState[Job]]:
    states = [
        RecoverableState(
            default_state=Job(), persist_state_key=f"job-{i}", persistence_enabled=True, event_manager=manager
        )
        for i in range(count)
    ]
    await RecoverableState.initialize_many(states)
    return states


def change(states: list[RecoverableState[Job]], by: int = 1) -> None:
    for i, state in enumerate(states):
        state.current_value.done += i + by
        state.current_value.name = f"job {i} at {state.current_value.done}"


async def stored_values() -> dict[str, Any]:
    kvs = await KeyValueStore.open()
    return {info.key: await kvs.get_value(info.key) for info in await kvs.list_keys()}


def in_memory(states: list[RecoverableState[Job]]) -> dict[str, Any]:
    return {s.persist_state_key: s.current_value.model_dump(mode="json") for s in states}


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `condition()` holds (it changes in other threads too); fail after `timeout`."""
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


async def wait_for_polls(metadata: FakeMetadata, path: str, count: int) -> None:
    await eventually(lambda: len(metadata.polls(path)) >= count)


async def test_an_aws_spot_notice_persists_every_state_as_migrating_once(metadata: FakeMetadata) -> None:
    metadata.imdsv2 = "required"
    manager = EventManager(
        persist_state_interval=HOUR, preemption_notice_url=metadata.aws_url, preemption_poll_interval=POLL
    )
    async with manager:
        recorder = Recorder(manager)
        states = await start_states(manager)
        change(states)
        await wait_for_polls(metadata, AWS_PATH, 2)  # polling, and no notice yet
        assert recorder.migrating == []
        assert recorder.persists == [FIRST_TICK]
        assert await stored_values() == {}

        metadata.notice = True
        await recorder.wait_for_migrating()
        await manager.wait_for_all_listeners_to_complete()
        assert await stored_values() == in_memory(states)
        assert recorder.persists == [FIRST_TICK, EventPersistStateData(is_migrating=True)]
        (notice,) = recorder.migrating
        assert notice.time_remaining is not None
        assert timedelta(seconds=100) < notice.time_remaining <= timedelta(seconds=120)

        # Once: the notice stays up, but the poller has stopped asking.
        polls = len(metadata.polls(AWS_PATH))
        await anyio.sleep(10 * POLL.total_seconds())
        assert len(recorder.migrating) == 1
        assert len(metadata.polls(AWS_PATH)) == polls
        manager.off(event=Event.PERSIST_STATE, listener=recorder.persists.append)
    # IMDSv2: every poll carried the token from PUT /latest/api/token.
    assert all(h.get("x-aws-ec2-metadata-token") == TOKEN for h in metadata.polls(AWS_PATH))


async def test_without_an_imdsv2_token_service_the_poller_asks_with_imdsv1(metadata: FakeMetadata) -> None:
    metadata.imdsv2 = "unavailable"
    metadata.notice = True
    async with EventManager(
        persist_state_interval=HOUR, preemption_notice_url=metadata.aws_url, preemption_poll_interval=POLL
    ) as manager:
        recorder = Recorder(manager)
        await recorder.wait_for_migrating()
        manager.off(event=Event.PERSIST_STATE)
    assert any(m == "PUT" for m, _, _ in metadata.requests)  # it did try for a token
    assert metadata.polls(AWS_PATH)
    assert all("x-aws-ec2-metadata-token" not in h for h in metadata.polls(AWS_PATH))


async def test_a_gcp_preemption_persists_every_state_as_migrating(metadata: FakeMetadata) -> None:
    manager = EventManager(
        persist_state_interval=HOUR, preemption_notice_url=metadata.gcp_url, preemption_poll_interval=POLL
    )
    async with manager:
        recorder = Recorder(manager)
        states = await start_states(manager)
        change(states, by=3)
        await wait_for_polls(metadata, GCP_PATH, 2)
        assert recorder.migrating == []
        metadata.notice = True
        await recorder.wait_for_migrating()
        await manager.wait_for_all_listeners_to_complete()
        assert await stored_values() == in_memory(states)
        assert recorder.migrating == [EventMigratingData(time_remaining=None)]
        assert recorder.persists == [FIRST_TICK, EventPersistStateData(is_migrating=True)]
        manager.off(event=Event.PERSIST_STATE, listener=recorder.persists.append)
    assert all(h.get("metadata-flavor") == "Google" for h in metadata.polls(GCP_PATH))


@pytest.mark.parametrize("kind", ["aws", "gcp"])
async def test_no_notice_emits_nothing(metadata: FakeMetadata, kind: str) -> None:
    url, path = (metadata.aws_url, AWS_PATH) if kind == "aws" else (metadata.gcp_url, GCP_PATH)
    manager = EventManager(
        persist_state_interval=HOUR, preemption_notice_url=url, preemption_poll_interval=POLL
    )
    async with manager:
        recorder = Recorder(manager)
        states = await start_states(manager, 5)
        change(states)
        await wait_for_polls(metadata, path, 5)
        assert recorder.migrating == []
        assert recorder.persists == [FIRST_TICK]
        assert await stored_values() == {}
    # Leaving persists as usual, not as a migration.
    assert recorder.persists == [FIRST_TICK, EventPersistStateData(is_migrating=False)]
    assert await stored_values() == in_memory(states)


async def test_failed_polls_are_logged_at_debug_and_retried(
    metadata: FakeMetadata, caplog: pytest.LogCaptureFixture
) -> None:
    metadata.failures = 3
    metadata.notice = True
    with caplog.at_level(logging.DEBUG, logger="recoverable_state"):
        async with EventManager(
            persist_state_interval=HOUR, preemption_notice_url=metadata.gcp_url, preemption_poll_interval=POLL
        ) as manager:
            recorder = Recorder(manager)
            await recorder.wait_for_migrating()
            manager.off(event=Event.PERSIST_STATE)
    assert len(recorder.migrating) == 1
    assert len(metadata.polls(GCP_PATH)) == 4
    failures = [r for r in caplog.records if "poll" in r.getMessage() and "failed" in r.getMessage()]
    assert len(failures) == 3
    assert all(r.levelno == logging.DEBUG for r in failures)


async def test_an_unreachable_metadata_service_never_harms_the_manager() -> None:
    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        await listener.aclose()  # nothing listens there now: every poll is refused
        manager = EventManager(
            persist_state_interval=HOUR,
            preemption_notice_url=f"http://127.0.0.1:{port}{AWS_PATH}",
            preemption_poll_interval=POLL,
        )
        async with manager:
            recorder = Recorder(manager)
            await anyio.sleep(10 * POLL.total_seconds())
            assert manager.active
            manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData())
            await manager.wait_for_all_listeners_to_complete()
            assert recorder.persists == [FIRST_TICK, EventPersistStateData()]
            assert recorder.migrating == []
            manager.off(event=Event.PERSIST_STATE)


async def test_the_notice_url_and_interval_come_from_the_environment(
    metadata: FakeMetadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECOVERABLE_STATE_PREEMPTION_NOTICE_URL", metadata.gcp_url)
    monkeypatch.setenv("RECOVERABLE_STATE_PREEMPTION_POLL_INTERVAL", "0.05")
    service_locator.reset()
    manager = service_locator.get_event_manager()
    assert manager.preemption_notice_url == metadata.gcp_url
    async with manager:
        recorder = Recorder(manager)
        states = await start_states(manager, 3)
        change(states)
        await wait_for_polls(metadata, GCP_PATH, 2)
        metadata.notice = True
        await recorder.wait_for_migrating()
        await manager.wait_for_all_listeners_to_complete()
        assert await stored_values() == in_memory(states)
        manager.off(event=Event.PERSIST_STATE, listener=recorder.persists.append)
    # An empty value turns polling off again.
    monkeypatch.setenv("RECOVERABLE_STATE_PREEMPTION_NOTICE_URL", "")
    service_locator.reset()
    assert service_locator.get_event_manager().preemption_notice_url is None
    assert EventManager().preemption_notice_url is None


async def test_a_migrating_the_user_emits_persists_every_state_as_migrating() -> None:
    manager = EventManager(persist_state_interval=HOUR)
    async with manager:
        recorder = Recorder(manager)
        states = await start_states(manager)
        change(states)
        notice = EventMigratingData(time_remaining=timedelta(seconds=30))
        manager.emit(event=Event.MIGRATING, event_data=notice)
        await manager.wait_for_all_listeners_to_complete()
        assert await stored_values() == in_memory(states)
        assert recorder.migrating == [notice]
        assert recorder.persists == [FIRST_TICK, EventPersistStateData(is_migrating=True)]
        manager.off(event=Event.PERSIST_STATE, listener=recorder.persists.append)


def test_notice_urls_shorthands_and_kinds() -> None:
    def source(url: str, kind: Any = "auto") -> tuple[str, str]:
        poller = PreemptionNoticePoller(url, kind=kind)
        return poller.url, poller.kind

    assert source("aws") == (AWS_SPOT_NOTICE_URL, "aws")
    assert source("GCP") == (GCP_PREEMPTED_URL, "gcp")
    assert source("http://10.0.0.1:8080/latest/meta-data/spot/instance-action")[1] == "aws"
    assert source("http://meta:80/computeMetadata/v1/instance/preempted")[1] == "gcp"
    assert source("http://127.0.0.1:9/notice", "gcp") == ("http://127.0.0.1:9/notice", "gcp")
    assert EventManager(preemption_notice_url="aws").preemption_notice_url == AWS_SPOT_NOTICE_URL
    with pytest.raises(ValueError, match="cannot tell"):
        source("http://127.0.0.1:9/notice")
    with pytest.raises(ValueError, match="not an http"):
        EventManager(preemption_notice_url="ftp://example/notice")
    with pytest.raises(ValueError, match="positive"):
        EventManager(preemption_notice_url="aws", preemption_poll_interval=timedelta(0))
