"""The Redis backend's durability: the options that wait after a batch, and what the server says.

Options, in the URL's query or as the backend's arguments:

- `wait_replicas=N`: after each write batch, and each read batch with claims,
  `WAIT N <ms>` on the same connection (WAIT counts the replicas that acknowledged
  *that connection's* writes). Fewer than N within `wait_timeout`: each applied
  write of the batch is answered with a NotDurableError (its `outcome` says what
  was applied); a read batch whose claims bumped a record raises one.
- `fsync=true`: after each write batch, `WAITAOF 1 0 <ms>`: the server's AOF fsynced
  with the batch in it (Redis 7.2 or later, `appendonly yes`: checked at open).
- `wait_timeout=SECONDS` (default 1): how long each of those waits; at most half
  the retry budget, so that the reply comes before the socket's timeout.

At open (the backend's first connection) the server is asked `HELLO` (its version,
allowed to every ACL) and `CONFIG GET appendonly appendfsync save` (refused to a
user without `@admin`: then `INFO persistence`, and when that is refused too, a
DEBUG line says the settings could not be read). One WARNING per backend says when
an acknowledged write can be lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.exceptions

from .._errors import StorageError
from ._backend import Durability
from ._url import REDIS_DURABILITY_OPTIONS, redact_url

_log = logging.getLogger("recoverable_state.storage")

OPTIONS = REDIS_DURABILITY_OPTIONS
"""The query parameters of a `redis://` URL that this module reads (the driver never sees them)."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_WAITAOF_SINCE = (7, 2)


@dataclass(frozen=True, slots=True)
class WaitOptions:
    """What a write batch waits for after its script."""

    replicas: int = 0
    timeout: float = 1.0
    fsync: bool = False

    @property
    def waits(self) -> bool:
        return self.replicas > 0 or self.fsync


def wait_options(
    url: str, *, wait_replicas: int | None, wait_timeout: float | None, fsync: bool | None
) -> tuple[WaitOptions, str]:
    """The options from the URL's query and the arguments (both must agree), and the URL without them."""
    query = {k: v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True) if k in OPTIONS}
    shown = redact_url(url.split("?", 1)[0])

    def bad(name: str, value: object, wanted: str) -> StorageError:
        return StorageError(f"storage URL {shown!r}: {name}={value!r} is not {wanted}")

    def pick(name: str, given: Any, parse: Any) -> Any:
        from_url = parse(query[name]) if name in query else None
        if given is not None and from_url is not None and given != from_url:
            raise StorageError(
                f"storage URL {shown!r}: {name} is {query[name]!r} in the URL and {given!r} as an argument"
            )
        return given if given is not None else from_url

    def as_int(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise bad("wait_replicas", text, "a whole number of replicas") from None

    def as_float(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise bad("wait_timeout", text, "a number of seconds") from None

    def as_bool(text: str) -> bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise bad("fsync", text, "true or false")

    replicas = pick("wait_replicas", wait_replicas, as_int) or 0
    timeout = pick("wait_timeout", wait_timeout, as_float)
    sync = bool(pick("fsync", fsync, as_bool))
    if replicas < 0:
        raise bad("wait_replicas", replicas, "0 or more")
    if timeout is not None and not timeout > 0:
        raise bad("wait_timeout", timeout, "a number of seconds above 0")
    return WaitOptions(replicas, 1.0 if timeout is None else timeout, sync), strip_options(url)


def strip_options(url: str) -> str:
    """`url` without this module's query parameters (redis-py would take them for its own)."""
    if "?" not in url:
        return url
    base, query = url.split("?", 1)
    kept = [part for part in query.split("&") if part and unquote(part.split("=", 1)[0]) not in OPTIONS]
    return base + ("?" + "&".join(kept) if kept else "")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass
class ServerFacts:
    """What the server told of itself at open (None: it refused to say)."""

    version: str | None = None
    mode: str | None = None
    role: str | None = None
    appendonly: str | None = None
    appendfsync: str | None = None
    save: str | None = None
    replicas: int | None = None
    refused: tuple[str, ...] = ()

    @property
    def version_tuple(self) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in (self.version or "").split(".")[:2])
        except ValueError:
            return ()


def read_facts(client: redis.Redis) -> ServerFacts:
    """HELLO, the persistence settings and the replicas, each where the ACL allows it."""
    facts = ServerFacts()
    refused: list[str] = []
    hello = client.execute_command("HELLO")  # type: ignore[no-untyped-call]
    items = hello if isinstance(hello, dict) else dict(zip(hello[::2], hello[1::2], strict=False))
    found = {_text(k): v for k, v in items.items()}
    facts.version, facts.mode, facts.role = (
        _text(found.get(k, "")) or None for k in ("version", "mode", "role")
    )
    try:
        config = client.execute_command("CONFIG", "GET", "appendonly", "appendfsync", "save")  # type: ignore[no-untyped-call]
        pairs = config if isinstance(config, dict) else dict(zip(config[::2], config[1::2], strict=False))
        settings = {_text(k): _text(v) for k, v in pairs.items()}
        facts.appendonly, facts.appendfsync = settings.get("appendonly"), settings.get("appendfsync")
        facts.save = settings.get("save")
    except redis.exceptions.NoPermissionError:
        refused.append("CONFIG GET")
        try:
            persistence = client.info("persistence")
            facts.appendonly = "yes" if str(persistence.get("aof_enabled")) == "1" else "no"
        except redis.exceptions.NoPermissionError:
            refused.append("INFO")
    try:
        facts.replicas = int(client.info("replication").get("connected_slaves", 0))
    except redis.exceptions.NoPermissionError:
        if "INFO" not in refused:
            refused.append("INFO")
    facts.refused = tuple(refused)
    return facts


def check_at_open(client: redis.Redis, url: str, options: WaitOptions) -> ServerFacts:
    """Refuse options the server cannot honour (StorageError naming why); warn once of losable writes."""
    facts = read_facts(client)
    where = f"Redis server {url}"
    refuse_unhonoured(client, facts, where, options)
    note_unread(where, facts.refused)
    risk = losable(facts, options)
    if risk:
        _log.warning("%s: an acknowledged write can be lost: %s", where, risk)
    return facts


def refuse_unhonoured(client: redis.Redis, facts: ServerFacts, where: str, options: WaitOptions) -> None:
    """A StorageError when `options` ask what this server (`where`, for the message) cannot do."""
    if options.fsync:
        if facts.version_tuple and facts.version_tuple < _WAITAOF_SINCE:
            raise StorageError(
                f"{where} is version {facts.version}: fsync=true needs WAITAOF, which Redis has "
                "since 7.2; upgrade the server, or drop fsync and configure `appendfsync always`"
            )
        if facts.appendonly == "no":
            raise StorageError(
                f"{where} has appendonly no: fsync=true waits for the AOF to be fsynced, and there is none"
            )
    if options.replicas:
        try:
            client.execute_command("WAIT", 0, 0)  # type: ignore[no-untyped-call]
        except redis.exceptions.NoPermissionError as exc:
            raise StorageError(
                f"{where} refuses WAIT to this user ({exc}): wait_replicas needs the @connection category"
            ) from exc


def note_unread(where: str, refused: Iterable[str]) -> None:
    """One DEBUG line when the ACL kept the persistence settings from being read."""
    names = list(dict.fromkeys(refused))
    if names:
        _log.debug(
            "%s: the persistence settings could not be read (%s refused by the ACL): durability not checked",
            where,
            " and ".join(names),
        )


def wait_ms(options: WaitOptions, budget: float) -> int:
    """How long (ms) each WAIT / WAITAOF may take: `wait_timeout`, at most half the reply's budget."""
    return max(int(min(options.timeout, budget / 2) * 1000), 1)


def add_waits(pipe: Any, options: WaitOptions, ms: int) -> None:
    """Queue WAITAOF and / or WAIT on a pipeline, after its writes (same connection)."""
    if options.fsync:
        pipe.execute_command("WAITAOF", 1, 0, ms)
    if options.replicas:
        pipe.execute_command("WAIT", options.replicas, ms)


def shortfall(acks: Sequence[Any], options: WaitOptions, ms: int, done: str) -> tuple[str, int | None] | None:
    """What the replies of `add_waits` fell short of (message, replicas acknowledged), or None.

    `done` says what was done where, for the message ("written to Redis server ...").
    """
    waited = f"{ms / 1000:g} s"
    for ack in acks:
        if isinstance(ack, BaseException):
            return f"{done}, but waiting for it failed ({ack}): not durable yet", None
    if options.fsync and int(acks[0][0]) < 1:
        return f"{done}, but its AOF was not fsynced within {waited} (fsync=true): not durable yet", None
    if options.replicas and int(acks[-1]) < options.replicas:
        got = int(acks[-1])
        return (
            f"{done}, but {got} of {options.replicas} replica(s) acknowledged it within {waited} "
            f"(wait_replicas={options.replicas}): not durable yet",
            got,
        )
    return None


def losable(facts: ServerFacts, options: WaitOptions) -> str | None:
    """How an acknowledged write can be lost with these settings and options (None: it cannot, or unknown)."""
    if options.fsync:
        return None  # every batch waits for its AOF fsync
    if facts.appendonly == "no":
        saved = f"the last RDB snapshot (save {facts.save!r})" if facts.save else "the last RDB snapshot"
        if facts.save == "":
            saved = "nothing (no RDB snapshots either: save '')"
        return f"appendonly is no, so a restart or crash of the server keeps only {saved}"
    if facts.appendfsync == "everysec":
        return "appendfsync is everysec: a crash can lose up to a second (or two) of acknowledged writes"
    if facts.appendfsync == "no":
        return (
            "appendfsync is no: the OS writes the AOF when it likes; a machine crash can lose tens of seconds"
        )
    return None


def describe(facts: ServerFacts, options: WaitOptions) -> Durability:
    """The Durability of a Redis backend from what its server said."""
    details = {
        k: v
        for k, v in {
            "version": facts.version,
            "mode": facts.mode,
            "role": facts.role,
            "appendonly": facts.appendonly,
            "appendfsync": facts.appendfsync,
            "save": facts.save,
            "connected_replicas": None if facts.replicas is None else str(facts.replicas),
            "wait_replicas": str(options.replicas),
            "fsync": "true" if options.fsync else "false",
            "refused_by_acl": ", ".join(facts.refused) or None,
        }.items()
        if v is not None
    }
    risk = losable(facts, options)
    waited = f"; each batch waits for {options.replicas} replica(s)" if options.replicas else ""
    if risk is not None:
        return Durability("redis", False, f"an acknowledged write can be lost: {risk}{waited}", details)
    if options.fsync:
        return Durability(
            "redis", True, f"durable on ack: each batch waits for the AOF fsync (WAITAOF){waited}", details
        )
    if facts.appendonly == "yes" and facts.appendfsync == "always":
        return Durability(
            "redis", True, f"durable on ack: appendonly yes, appendfsync always{waited}", details
        )
    return Durability("redis", None, f"unknown: the server did not say how it persists{waited}", details)
