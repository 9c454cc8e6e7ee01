"""The bot's Redis client, from REDIS_URL (or the embedded server's URL): the URL checked
before anything connects, a bounded waiting pool, and retries that ride out a Redis restart."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

REDIS_MAX_CONNECTIONS = 64  # per process; more commands in flight wait for a free connection


class RedisUrlError(ValueError):
    """REDIS_URL cannot be used as written. The message never quotes the URL: it may hold a
    password."""


def check_redis_url(url: str) -> None:
    """Raise RedisUrlError unless `url` is a redis://, rediss:// or unix:// URL with a valid
    port and database index (redis-py would silently use database 0 for `/x`)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise RedisUrlError(
            "REDIS_URL is not a Redis URL: it must start with redis://, rediss:// or unix:// "
            "(e.g. redis://:PASSWORD@localhost:6379/0)"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise RedisUrlError("REDIS_URL names no socket path (e.g. unix:///run/redis.sock)")
        return
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise RedisUrlError("REDIS_URL has an invalid port: it must be a number from 1 to 65535")
    if not parts.hostname:
        raise RedisUrlError("REDIS_URL names no host (e.g. redis://localhost:6379/0)")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise RedisUrlError(
            "REDIS_URL has an invalid database index: the path must be a number such as /0"
        )


def connect_redis(url: str) -> Redis:
    """The bot's Redis client: it rides out bursts and reconnects by itself after Redis restarts.

    - A burst of questions waits for a free connection (up to 10 s) instead of failing: redis-py's
      default pool raises "Too many connections" at once past 100 commands in flight.
    - Pooled connections go stale when Redis restarts, and without retries the first command on
      each of them fails ("Connection closed by server") although Redis is back. So a command
      that meets a closed or refused connection is retried on a fresh one, 5 times with
      exponential backoff and equal jitter: 1.1 to 2.2 s in all, which rides out a restart; a
      longer outage ends in a StoreError that the service turns into a clear message with an
      error id. Only connection errors are retried: after a timeout the command may have run,
      and the turn should fail rather than wait again.
    - `socket_timeout` bounds a hung server, which would otherwise hold a conversation's turn
      (and every later question in that channel) forever.

    Raises RedisUrlError for a URL that is not usable as written (nothing is connected yet).
    """
    check_redis_url(url)
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=10,
            health_check_interval=30,
            socket_connect_timeout=5,
            socket_timeout=10,
            retry=Retry(
                EqualJitterBackoff(cap=1.0, base=0.04),
                retries=5,
                supported_errors=(RedisConnectionError,),
            ),
            retry_on_error=[RedisConnectionError],
        )
    except ValueError as exc:  # e.g. an invalid query parameter; redis-py's text quotes no URL
        raise RedisUrlError(f"REDIS_URL is not usable: {exc}") from None
    return Redis.from_pool(pool)
