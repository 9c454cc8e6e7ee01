"""Conversations as values, and the one interface through which the core keeps them.

`Store` is what the service and the front door need from storage; bot.store implements it over
Redis. Keys carry a Redis Cluster hash tag, `{platform:workspace:channel}`, so a channel's
history, its thread histories and its settings live in one slot and can share a transaction.
This module is pure: no Redis client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

from bot.llm.base import ChatMessage
from bot.sampling import AuditEntry, ChannelSettings, SamplingSettings, SettingValue

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


class TurnLocks:
    """One FIFO lock per conversation, dropped when nobody holds or waits for it: the turns of a
    conversation run one at a time, in the order they took their place."""

    def __init__(self) -> None:
        self._locks: dict[ConversationKey, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: ConversationKey) -> AsyncIterator[None]:
        lock, refs = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, refs + 1)
        try:
            async with lock:  # the first await: the place in line is taken in call order
                yield
        finally:
            lock, refs = self._locks[key]
            if refs <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, refs - 1)


@dataclass(frozen=True, slots=True)
class Turn:
    """What a question's turn starts from: the channel's settings and the history before it."""

    settings: ChannelSettings
    history: list[Message]
    # collection -> version of the knowledge base, read in the same round trip
    kb_versions: Mapping[str, int] = field(default_factory=dict)
    handed_off: bool = False  # a human has this thread: the question is withdrawn, not answered
    # False: the question was the history's last message already (asked again after a failed
    # answer, or re-delivered after a crash), so it was not stored twice
    question_stored: bool = True


Vote = Literal["up", "down"]


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    """A delivered answer, kept so that votes (and the report) can refer to it by `answer_id`."""

    answer_id: str
    question: str
    backend: str
    asker: str
    at: float  # unix time
    first_token_s: float | None = None
    no_passage: bool = False  # knowledge was on and no passage was relevant


class StoreError(Exception):
    """The store could not be reached or refused a command; the message is for logs."""


class Store(Protocol):
    """Everything the core keeps: conversations, channel settings and their log, event claims.

    Every method raises StoreError when storage fails.
    """

    @property
    def defaults(self) -> SamplingSettings: ...

    @property
    def max_new_tokens_limit(self) -> int: ...

    async def start_turn(
        self,
        key: ConversationKey,
        question: Message,
        thread: str | None = None,
        asker: str | None = None,
    ) -> Turn:
        """Store the question and read the settings and the history before it: one round trip
        (so a failed answer never loses the question; a question that is the history's last
        message already is not stored again). With `thread` (a thread, or a channel
        where there are none), whether a human has it rides along, and with `asker` the thread
        remembers whom the bot answers there (their follow-ups need no mention)."""
        ...

    async def open_handoff(
        self, key: ConversationKey, answer_id: str, thread: str
    ) -> AnswerRecord | None:
        """Hand `thread` of the channel of `key` to a human, from an answer; the answer's record
        (marked as handed off), or None, and nothing changed, when it is no longer stored."""
        ...

    async def close_handoff(self, key: ConversationKey, thread: str) -> bool:
        """The human is done ("Resolved"): the bot answers there again. False if not open."""
        ...

    async def finish_turn(
        self, key: ConversationKey, answer: Message, record: AnswerRecord | None = None
    ) -> None:
        """Store the answer (and its record, for votes) in one round trip."""
        ...

    async def vote(
        self, key: ConversationKey, answer_id: str, user: str, vote: Vote, at: float
    ) -> bool:
        """Record `user`'s vote on an answer of the channel of `key` (a later vote replaces it).
        False, and nothing changed, when that answer is no longer stored."""
        ...

    async def votes(self, key: ConversationKey, answer_id: str) -> dict[str, Vote]:
        """Each user's latest vote on an answer (operators, tests)."""
        ...

    async def history(self, key: ConversationKey) -> list[Message]:
        """The stored history of a conversation (operators, tests)."""
        ...

    async def withdraw(self, key: ConversationKey, question: Message) -> None:
        """Take back a question that was refused before any backend saw it (only one this turn
        stored: `Turn.question_stored`)."""
        ...

    async def channel_settings(self, key: ConversationKey) -> ChannelSettings: ...

    async def change_settings(
        self, key: ConversationKey, user: str, values: Mapping[str, SettingValue]
    ) -> ChannelSettings: ...

    async def reset_settings(self, key: ConversationKey, user: str) -> ChannelSettings: ...

    async def settings_log(self, key: ConversationKey, limit: int = 20) -> list[AuditEntry]: ...

    async def forget(self, key: ConversationKey, user: str) -> int:
        """Delete the channel's histories (threads included), logged; returns keys removed."""
        ...

    lease_s: float  # how long an event's lease lasts unless renewed

    async def claim(
        self, platform: str, *ids: str, conversation: ConversationKey | None = None
    ) -> str | None:
        """A lease on the event named by `ids`: its token when this caller won every id
        (exactly-once), else None. It expires unless renewed, and marks the event done when
        completed. With `conversation`, also that conversation's turn across replicas."""
        ...

    async def renew(
        self,
        platform: str,
        ids: Sequence[str],
        token: str,
        conversation: ConversationKey | None = None,
    ) -> bool:
        """Extend a lease still held by `token`; False when it was lost."""
        ...

    async def complete(
        self,
        platform: str,
        ids: Sequence[str],
        token: str,
        conversation: ConversationKey | None = None,
    ) -> None:
        """The answer was delivered: no later delivery of the event is answered."""
        ...

    async def release(
        self,
        platform: str,
        ids: Sequence[str],
        token: str,
        conversation: ConversationKey | None = None,
    ) -> None:
        """The answer was not delivered: let the event and the turn go before their lease ends."""
        ...

    async def may_follow_up(self, key: ConversationKey, user: str) -> bool:
        """Whether `user`'s message without a mention in this thread is a follow-up: the bot
        last answered them there, and the thread is not handed off to a human. One round trip."""
        ...

    async def ping(self) -> None: ...
