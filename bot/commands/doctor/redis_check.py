"""doctor: Redis (REDIS_URL, or the embedded server and DATA_DIR)."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ReadOnlyError, RedisError, ResponseError

from bot.commands.doctor.checks import (
    NETWORK_TIMEOUT_S,
    Check,
    fail,
    in_thread,
    mask_url,
    ok,
    reason,
)
from bot.config import Settings
from bot.ops.redis_server import RedisServer, RedisServerError

EMBEDDED_REDIS_TIMEOUT_S = 15.0


async def check_redis(settings: Settings) -> list[Check]:
    if settings.redis_url is None:
        return await _check_embedded_redis(settings.data_dir)
    url = settings.redis_url.get_secret_value()
    shown = mask_url(url)
    try:
        version = await _probe_redis(url)
    except AuthenticationError:
        return fail("redis", f"{shown}: authentication failed (the password in REDIS_URL?)")
    except ReadOnlyError:
        return fail("redis", f"{shown} is read-only (a replica?): the bot needs to write")
    except (RedisError, OSError, TimeoutError, ValueError) as exc:
        return fail("redis", f"cannot use {shown}: {reason(exc)}")
    return ok("redis", f"{shown} answers (SET/GET/DEL; Redis {version})")


async def _check_embedded_redis(data_dir: Path) -> list[Check]:
    # Without persistence: a bot already running over DATA_DIR keeps sole use of its files.
    server = RedisServer(data_dir, persist=False)
    try:
        await in_thread(server.start, EMBEDDED_REDIS_TIMEOUT_S)  # creates DATA_DIR, as the bot
    except RedisServerError as exc:
        return fail("redis", f"embedded redis-server: {exc}")
    except TimeoutError:
        return fail("redis", "embedded redis-server did not start in time; or set REDIS_URL")
    try:
        await in_thread(lambda: _probe_writable(data_dir), NETWORK_TIMEOUT_S)
        version = await _probe_redis(server.url)
    except OSError as exc:  # from the DATA_DIR probe: redis-py wraps its own in RedisError
        return fail("redis", f"DATA_DIR {data_dir} is not writable ({exc.strerror or exc})")
    except (RedisError, TimeoutError) as exc:
        return fail("redis", f"embedded redis-server does not answer: {reason(exc)}")
    finally:
        await in_thread(server.stop, EMBEDDED_REDIS_TIMEOUT_S)
    return ok(
        "redis",
        f"embedded redis-server {version} answers (SET/GET/DEL); DATA_DIR {data_dir} is writable",
    )


async def _probe_redis(url: str) -> str:
    """SET, GET and DEL a key of our own; the server's version."""
    client = Redis.from_url(
        url, socket_connect_timeout=NETWORK_TIMEOUT_S / 2, socket_timeout=NETWORK_TIMEOUT_S
    )
    try:
        return await asyncio.wait_for(_round_trip(client), NETWORK_TIMEOUT_S)
    finally:
        await client.aclose()


async def _round_trip(client: Redis) -> str:
    key = f"supportbot:doctor:{uuid.uuid4().hex}"
    value = uuid.uuid4().hex
    await client.set(key, value, ex=60)  # expires by itself should DEL never run
    read = await client.get(key)
    await client.delete(key)
    if read != value.encode():
        raise RedisError("a value written was not read back")
    try:
        info = await client.info("server")
    except ResponseError:  # managed services may disable INFO
        return "(version not shown)"
    return str(info.get("redis_version", "(version not shown)"))


def _probe_writable(directory: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
        pass
