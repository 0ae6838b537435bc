"""Storage URLs: their query parameters checked against what a backend accepts, passwords kept out."""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .._errors import StorageError


def redact_url(url: str) -> str:
    """The URL without any password (in the user part or the query), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return parts._replace(netloc=netloc, query=query).geturl()


def url_passwords(url: str) -> list[str]:
    """The passwords a URL carries (user part and query), to scrub them from any text."""
    parts = urlsplit(url)
    found = [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        if ":" in userinfo:
            secret = userinfo.split(":", 1)[1]
            found += [secret, unquote(secret)]
    return [p for p in found if p]


def url_options(url: str, allowed: Collection[str]) -> dict[str, str]:
    """The query parameters of a storage URL, each one checked against those its backend accepts.

    A backend's factory calls it first, so that a misspelt or unsupported
    parameter fails when the URL is opened (a StorageError naming it and listing
    the accepted ones) instead of being ignored or failing deep in a driver. The
    message shows the URL without its query and its password (a value might be a
    secret), and only the parameter's name.
    """
    options: dict[str, str] = {}
    parts = urlsplit(url)
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in allowed:
            accepted = ", ".join(sorted(allowed)) if allowed else "none"
            shown = url.split("?", 1)[0]
            if "@" in urlsplit(shown).netloc:  # else as written: geturl would respell sqlite:////abs
                shown = redact_url(shown)
            raise StorageError(
                f"storage URL {shown!r} has a query parameter {name!r} that {parts.scheme.lower()}:// "
                f"does not accept (it accepts: {accepted})"
            )
        options[name] = value
    return options


REDIS_DURABILITY_OPTIONS = frozenset({"wait_replicas", "wait_timeout", "fsync"})
"""The query parameters of a Redis URL (one server or a cluster) that the backend reads for
durability (`_redis_durability.py`); the driver never sees them. Kept here, beside the other
URL helpers, so that checking a URL never imports the driver."""
