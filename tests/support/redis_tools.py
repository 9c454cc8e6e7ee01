"""Redis helpers for tests: a client that counts round trips, and a restartable server.

Counting: a real redis-py client whose connections count network writes (one per round trip).

redis-py sends a command, or a whole pipeline, with one `send_packed_command` and then reads the
replies, so counting those calls counts round trips to the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection

from bot.ops.redis_server import RedisServer, free_port


class RoundTrips:
    count = 0


class CountingConnection(Connection):
    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        RoundTrips.count += 1
        await super().send_packed_command(command, check_health)


def counting_client(url: str) -> Redis:
    pool = ConnectionPool.from_url(url, connection_class=CountingConnection)
    return Redis(connection_pool=pool)


@asynccontextmanager
async def redis_in(data_dir: Path) -> AsyncIterator[Redis]:
    """A persistent redis-server over `data_dir`, for restart tests: start, use, stop."""
    server = RedisServer(data_dir, port=free_port()).start()
    client = Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()
        server.stop()
