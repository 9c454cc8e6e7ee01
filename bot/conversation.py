"""Conversations: whose history a message joins, and the Redis store that keeps it.

Keys carry a Redis Cluster hash tag, `{platform:workspace:channel}`, so a channel's history,
its thread histories and its settings live in one slot and can share a transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from bot.llm.base import ChatMessage

Role = Literal["system", "user", "assistant"]
HistoryScope = Literal["channel", "thread"]


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Where a message was posted. `thread` is the thread's root id, or None at top level."""

    platform: str  # "slack" | "discord" | "console"
    workspace: str  # Slack team id, Discord guild id ("dm" for direct messages), "local"
    channel: str
    thread: str | None = None

    @property
    def channel_tag(self) -> str:
        # The hash tag: everything about one channel hashes to one Cluster slot.
        return "{" + f"{self.platform}:{self.workspace}:{self.channel}" + "}"

    def scoped(self, scope: HistoryScope) -> ConversationKey:
        """The key whose history this message joins under HISTORY_SCOPE."""
        if scope == "channel":
            return ConversationKey(self.platform, self.workspace, self.channel)
        return self

    def describe(self) -> str:
        where = f"{self.platform}:{self.workspace}:{self.channel}"
        return f"{where}:{self.thread}" if self.thread else where


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str

    def as_chat(self) -> ChatMessage:
        return {"role": self.role, "content": self.content}

    def encode(self) -> str:
        return json.dumps({"role": self.role, "content": self.content}, ensure_ascii=False)

    @staticmethod
    def decode(raw: bytes | str) -> Message:
        data = json.loads(raw)
        return Message(role=cast(Role, data["role"]), content=str(data["content"]))


def history_key(key: ConversationKey) -> str:
    suffix = f":{key.thread}" if key.thread else ""
    return f"sb:{key.channel_tag}:history{suffix}"


class HistoryStore:
    """Role/content history per conversation: bounded, expiring after silence, one round trip
    per read and per write (each a MULTI/EXEC pipeline)."""

    def __init__(self, redis: Redis, *, max_messages: int, ttl_seconds: int) -> None:
        self._redis = redis
        self.max_messages = max_messages
        self.ttl_seconds = ttl_seconds

    async def read(self, key: ConversationKey) -> list[Message]:
        raw = await self._redis.lrange(history_key(key), 0, -1)
        return self.decode_list(raw)

    async def append(self, key: ConversationKey, *messages: Message) -> None:
        await self._push(key, messages, read_back=False)

    async def append_and_read(self, key: ConversationKey, message: Message) -> list[Message]:
        """Store `message` and return the history before it, in one round trip.

        The question is stored as soon as its turn starts, so a failed generation never loses it.
        """
        history = await self._push(key, (message,), read_back=True)
        return history[:-1]

    async def forget(self, key: ConversationKey) -> int:
        """Delete the channel's history and every thread history under it; returns keys removed."""
        pattern = f"sb:{_escape_glob(key.channel_tag)}:history*"
        keys = [k async for k in self._redis.scan_iter(match=pattern, count=500)]
        if not keys:
            return 0
        return int(await self._redis.delete(*keys))

    def queue_push(
        self, pipe: Pipeline, key: ConversationKey, messages: Sequence[Message], *, read_back: bool
    ) -> None:
        """Queue an append (and optionally a read of the whole list) on a caller's pipeline,
        so a caller can fold other reads of the same channel into the same round trip."""
        name = history_key(key)
        pipe.rpush(name, *(m.encode() for m in messages))
        pipe.ltrim(name, -self.max_messages, -1)
        pipe.expire(name, self.ttl_seconds)
        if read_back:
            pipe.lrange(name, 0, -1)

    @staticmethod
    def decode_list(raw: Sequence[bytes | str]) -> list[Message]:
        return [Message.decode(item) for item in raw]

    async def _push(
        self, key: ConversationKey, messages: Sequence[Message], *, read_back: bool
    ) -> list[Message]:
        async with self._redis.pipeline(transaction=True) as pipe:
            self.queue_push(pipe, key, messages, read_back=read_back)
            results = await pipe.execute()
        return self.decode_list(results[-1]) if read_back else []


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
