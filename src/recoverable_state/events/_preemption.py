"""Preemption notices: poll a cloud's instance metadata for "this machine goes away soon".

Two services are understood, told apart by `kind` (or by the URL):

- `aws`: the EC2 spot instance action,
  `http://169.254.169.254/latest/meta-data/spot/instance-action`. 404 means no
  notice; 200 carries `{"action": "terminate", "time": "2030-01-01T12:00:00Z"}`.
  IMDSv2 is used when it answers (a token from `PUT /latest/api/token`), IMDSv1
  otherwise.
- `gcp`: the Compute Engine preemption flag,
  `http://metadata.google.internal/computeMetadata/v1/instance/preempted`, asked
  with `Metadata-Flavor: Google`. The body `TRUE` means the notice has come.

The poller talks to the service with httpx over anyio (asyncio and trio alike),
never through a proxy. Failed polls are logged at debug level and tried again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.abc import TaskStatus

from .._config import as_timedelta

if TYPE_CHECKING:  # imported when first used: it costs a fifth of the package's import time
    import httpx

logger = logging.getLogger("recoverable_state")

PreemptionKind = Literal["aws", "gcp"]
"""Which metadata service a notice URL belongs to."""

AWS_SPOT_NOTICE_URL = "http://169.254.169.254/latest/meta-data/spot/instance-action"
"""Where an EC2 spot instance learns that it is about to be stopped or terminated."""

GCP_PREEMPTED_URL = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
"""Where a Compute Engine preemptible or spot VM learns that it is being preempted."""

_SHORTHANDS: dict[str, tuple[str, PreemptionKind]] = {
    "aws": (AWS_SPOT_NOTICE_URL, "aws"),
    "gcp": (GCP_PREEMPTED_URL, "gcp"),
}

_AWS_TOKEN_TTL = 21600  # seconds, the longest IMDSv2 allows
_AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_AWS_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


@dataclass(frozen=True)
class PreemptionNotice:
    """A notice read from the metadata service."""

    kind: PreemptionKind
    time_remaining: timedelta | None
    """How long until the machine is stopped, when the notice says so (AWS does)."""
    detail: str
    """The body of the notice, as the service sent it."""


class PreemptionPollError(Exception):
    """One poll got an answer that is neither a notice nor "no notice"."""


def resolve_notice_source(
    url: str, kind: Literal["auto", "aws", "gcp"] = "auto"
) -> tuple[str, PreemptionKind]:
    """The URL to poll and the kind of service behind it.

    `url` may be `"aws"` or `"gcp"` for the cloud's well-known address. With
    `kind="auto"` a URL under `/computeMetadata/` is GCP and one under
    `/latest/meta-data/` is AWS; any other URL needs an explicit kind.
    """
    text = url.strip()
    if text.lower() in _SHORTHANDS:
        default_url, default_kind = _SHORTHANDS[text.lower()]
        return default_url, default_kind if kind == "auto" else kind
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"preemption notice URL {url!r} is not an http(s) URL; give a URL, or 'aws' or 'gcp'"
        )
    if kind != "auto":
        return text, kind
    if "/computeMetadata/" in parts.path:
        return text, "gcp"
    if "/latest/meta-data/" in parts.path:
        return text, "aws"
    raise ValueError(
        f"cannot tell from preemption notice URL {url!r} whether it is AWS or GCP; "
        "set the kind (RECOVERABLE_STATE_PREEMPTION_NOTICE_KIND=aws or gcp)"
    )


def _aws_token_url(notice_url: str) -> str:
    """The IMDSv2 token address beside an AWS metadata URL (`.../latest/api/token`)."""
    parts = urlsplit(notice_url)
    prefix, found, _ = parts.path.partition("/latest/")
    path = (prefix if found else "") + "/latest/api/token"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _time_remaining(stamp: object) -> timedelta | None:
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # AWS gives UTC
    return max(when - datetime.now(UTC), timedelta(0))


class PreemptionNoticePoller:
    """Asks one metadata service whether a preemption notice has come.

    `await check()` polls once: a PreemptionNotice, None (no notice), or an
    exception for an answer it cannot read or a service it cannot reach.
    `watch()` polls every `interval` until the first notice and reports it once.
    """

    def __init__(
        self,
        url: str,
        *,
        kind: Literal["auto", "aws", "gcp"] = "auto",
        interval: timedelta = timedelta(seconds=5),
        request_timeout: timedelta = timedelta(seconds=2),
    ) -> None:
        self.url, self.kind = resolve_notice_source(url, kind)
        if interval <= timedelta(0):
            raise ValueError("the preemption poll interval must be positive")
        self.interval = interval
        self.request_timeout = request_timeout
        self._token_url = _aws_token_url(self.url) if self.kind == "aws" else None
        self._token: str | None = None
        self._token_expires = 0.0
        self._imdsv1 = False  # the token service did not answer: ask without a token

    def _client(self) -> httpx.AsyncClient:
        import httpx

        # trust_env=False: a metadata address must never be reached through an HTTP proxy.
        return httpx.AsyncClient(
            timeout=self.request_timeout.total_seconds(), trust_env=False, follow_redirects=False
        )

    async def check(self, client: httpx.AsyncClient | None = None) -> PreemptionNotice | None:
        """Poll once (with `client`, or a client of its own)."""
        if client is None:
            async with self._client() as own:
                return await self.check(own)
        if self.kind == "gcp":
            return await self._check_gcp(client)
        return await self._check_aws(client)

    async def _check_gcp(self, client: httpx.AsyncClient) -> PreemptionNotice | None:
        response = await client.get(self.url, headers={"Metadata-Flavor": "Google"})
        if response.status_code != 200:
            raise PreemptionPollError(f"GCP metadata answered {response.status_code}")
        body = response.text.strip()
        if body.upper() == "TRUE":
            return PreemptionNotice("gcp", None, body)
        if body.upper() == "FALSE":
            return None
        raise PreemptionPollError(f"GCP metadata answered an unexpected body {body[:80]!r}")

    async def _aws_headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        """An IMDSv2 token header when the token service answers; none (IMDSv1) otherwise."""
        if self._imdsv1:
            return {}
        if self._token is None or time.monotonic() >= self._token_expires:
            self._token = None
            assert self._token_url is not None
            import httpx

            try:
                response = await client.put(
                    self._token_url, headers={_AWS_TOKEN_TTL_HEADER: str(_AWS_TOKEN_TTL)}
                )
            except httpx.HTTPError as exc:
                logger.debug("no IMDSv2 token from %s (%r); asking without one", self._token_url, exc)
                self._imdsv1 = True
                return {}
            if response.status_code != 200 or not response.text.strip():
                logger.debug(
                    "no IMDSv2 token from %s (status %d); asking without one",
                    self._token_url,
                    response.status_code,
                )
                self._imdsv1 = True
                return {}
            self._token = response.text.strip()
            self._token_expires = time.monotonic() + _AWS_TOKEN_TTL - 60
        return {_AWS_TOKEN_HEADER: self._token}

    async def _check_aws(self, client: httpx.AsyncClient) -> PreemptionNotice | None:
        headers = await self._aws_headers(client)
        response = await client.get(self.url, headers=headers)
        if response.status_code == 404:
            return None
        if response.status_code == 401:
            # The token expired or was refused, or IMDSv2 became required: get a new one next time.
            self._token = None
            self._imdsv1 = False
            raise PreemptionPollError("AWS metadata refused the request (401); renewing the token")
        if response.status_code != 200:
            raise PreemptionPollError(f"AWS metadata answered {response.status_code}")
        body = response.text
        try:
            notice = json.loads(body)
        except ValueError:
            notice = None
        stamp = notice.get("time") if isinstance(notice, dict) else None
        return PreemptionNotice("aws", _time_remaining(stamp), body.strip())

    async def watch(
        self,
        on_notice: Callable[[PreemptionNotice], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll until the first notice, call `on_notice` with it once, and return."""
        seconds = self.interval.total_seconds()
        async with self._client() as client:
            task_status.started()
            while True:
                try:
                    notice = await self.check(client)
                except Exception as exc:  # whatever goes wrong, the next poll may work
                    logger.debug("preemption notice poll of %s failed: %r; trying again", self.url, exc)
                    notice = None
                if notice is not None:
                    on_notice(notice)
                    return
                await anyio.sleep(seconds)


def poller_for(
    url: str | None, kind: Literal["auto", "aws", "gcp"], interval: timedelta | float | None
) -> PreemptionNoticePoller | None:
    """The preemption notice poller for `url`, polling every `interval` (5 s); None or "": no polling."""
    if not url:
        return None
    try:
        import httpx  # noqa: F401  (the poller talks to the metadata service with it)
    except ImportError as exc:
        raise ImportError(
            "polling preemption notices needs httpx: pip install 'recoverable-state[preemption]'"
        ) from exc
    every = as_timedelta(5.0 if interval is None else interval, name="preemption_poll_interval")
    return PreemptionNoticePoller(url, kind=kind, interval=every)
