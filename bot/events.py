"""Exactly-once handling of platform events, shared by every replica through Redis.

A platform may deliver one event more than once (Slack re-sends when it did not see our 200 in
time, and several replicas may each get a copy). Before answering, a replica claims the event's
ids with `SET NX EX`; only the caller whose claim created every key answers. A re-delivery of an
event that no replica claimed (the first delivery was lost) finds no key and is answered.

Keys are `sb:event:<platform>:<id>`. The ids of one claim are set in one MULTI/EXEC, so two
racing copies of an event cannot each take a different id (and both stand down). Each claim
writes a token of its own and reads the key back in the same transaction: when the Redis client
retries a claim whose first attempt did run (the connection dropped before the reply), the retry
finds its own token and still wins, instead of taking its own claim for another replica's.
(The keys carry no hash tag, so on Redis Cluster the ids of one claim would need one in common
to share a transaction; the bot's client is a single-node one.)
"""

from __future__ import annotations

import os
import secrets
import socket

from redis.asyncio import Redis

# Slack re-sends an unacknowledged event three times within about five minutes; an hour covers
# that (and slow replicas) with room to spare while keeping the key count small.
DEFAULT_CLAIM_TTL_S = 3600


def _instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class EventClaims:
    def __init__(
        self, redis: Redis, *, ttl_s: int = DEFAULT_CLAIM_TTL_S, owner: str | None = None
    ) -> None:
        self._redis = redis
        self.ttl_s = ttl_s
        # Stored as the value, so an operator can see which replica took an event.
        self.owner = owner or _instance_name()

    @staticmethod
    def key(platform: str, event_id: str) -> str:
        return f"sb:event:{platform}:{event_id}"

    async def claim(self, platform: str, *ids: str) -> bool:
        """True when this caller is the first to claim every one of `ids`.

        Several ids name one event when the platform sends it in more than one form (Slack's
        `app_mention` and `message` for the same message have different event ids but the same
        channel and ts). All keys are set in one transaction (one round trip), so of two racing
        copies exactly one wins them all.
        """
        if not ids:
            raise ValueError("claim needs at least one id")
        token = f"{self.owner}:{secrets.token_hex(8)}"
        async with self._redis.pipeline(transaction=True) as pipe:
            for event_id in ids:
                key = self.key(platform, event_id)
                pipe.set(key, token, nx=True, ex=self.ttl_s)
                pipe.get(key)
            results = await pipe.execute()
        return all(_text(value) == token for value in results[1::2])


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
