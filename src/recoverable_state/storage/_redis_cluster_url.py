"""The Redis Cluster storage URL: `redis+cluster://[user:password@]host:port[,host:port...][/]`.

Every host listed is a seed: the client reads the slot map from the first one
that answers, so listing several keeps a cluster reachable while one node is
down. `redis://host:port/0?cluster=true` names the same backend from one seed.
A cluster has only database 0: any other path is refused.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from .._errors import StorageError
from ._backend import StorageBackend
from ._url import redact_url, url_options

CLUSTER_OPTIONS = frozenset(
    {"username", "password", "client_name", "health_check_interval", "socket_keepalive"}
)
"""What a Redis Cluster URL's query may set (and `cluster=true` in the `redis://` spelling)."""

_DEFAULT_PORT = 6379


def wants_cluster(url: str) -> bool:
    """Whether a `redis://` URL asks for a cluster (`?cluster=true`)."""
    query = urlsplit(url).query
    return any(part.lower() in ("cluster=true", "cluster=1", "cluster=yes") for part in query.split("&"))


def _seeds(url: str, netloc: str) -> list[tuple[str, int]]:
    hosts = netloc.rsplit("@", 1)[-1]
    seeds = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep:
            host, port = port, str(_DEFAULT_PORT)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StorageError(
                f"storage URL {redact_url(url)!r}: {part!r} is not host:port "
                "(write redis+cluster://host:port,host:port)"
            )
        seeds.append((host, int(port)))
    return seeds


def cluster_settings(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seeds and the client's connection options a Redis Cluster URL names (StorageError if bad)."""
    parts = urlsplit(url)
    options: dict[str, Any] = url_options(url, CLUSTER_OPTIONS | {"cluster"})
    if options.pop("cluster", "true").lower() not in ("true", "1", "yes"):
        raise StorageError(f"storage URL {redact_url(url)!r}: cluster= must be true for a Redis Cluster")
    if parts.path not in ("", "/", "/0"):
        raise StorageError(
            f"storage URL {redact_url(url)!r} names database {parts.path.lstrip('/')!r}: "
            "a Redis Cluster has only database 0"
        )
    if "@" in parts.netloc:
        user, _, password = parts.netloc.rsplit("@", 1)[0].partition(":")
        if user:
            options.setdefault("username", unquote(user))
        if password:
            options.setdefault("password", unquote(password))
    for flag in ("socket_keepalive",):
        if flag in options:
            options[flag] = options[flag].lower() in ("true", "1", "yes")
    if "health_check_interval" in options:
        try:
            options["health_check_interval"] = float(options["health_check_interval"])
        except ValueError:
            raise StorageError(
                f"storage URL {redact_url(url)!r}: health_check_interval must be a number of seconds"
            ) from None
    return _seeds(url, parts.netloc), options


def open_redis_cluster(url: str, **options: Any) -> StorageBackend:
    """`redis+cluster://host:port,host:port/` (or `redis://host:port/0?cluster=true`): a Redis Cluster."""
    try:
        from ._redis_cluster import RedisClusterBackend
    except ImportError as exc:
        raise StorageError(
            f"storage URL {redact_url(url)!r} needs redis-py: pip install 'recoverable-state[redis]'"
        ) from exc
    seeds, connection = cluster_settings(url)
    return RedisClusterBackend(url, startup_nodes=seeds, connection=connection, **options)
