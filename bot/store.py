"""RedisStore: everything the core keeps, in Redis, behind the `Store` interface.

- History per conversation: a list of role/content JSON, bounded (HISTORY_MAX_MESSAGES) and
  expiring after silence (HISTORY_TTL_SECONDS). A turn's start stores the question (once: not
  again when it is the last message already) and reads the settings and the history in one
  MULTI/EXEC round trip.
- Channel settings: a hash of overrides (no expiry: they survive restarts and silence) and an
  audit list of changes.
- Event claims (exactly-once across replicas, through crashes): a lease on every id of an
  event (and on the conversation's turn), taken in one script, renewed while the answer is
  produced and turned into a done mark when it is delivered. Each claim writes a token of its
  own, so when the client retries a claim whose first attempt did run (the connection dropped
  before the reply), the retry finds its own token and still wins instead of standing down.
- Threads the bot answered in (follow-ups without a mention).

Keys share the channel's hash tag (bot.conversation). Every RedisError leaves as StoreError.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from bot.conversation import AnswerRecord, ConversationKey, Message, StoreError, Turn, Vote
from bot.reporting import AnswerRow, Where
from bot.sampling import (
    KEYS,
    AuditEntry,
    ChannelSettings,
    KnowledgeChoice,
    SamplingSettings,
    SettingsError,
    SettingValue,
    format_value,
    parse_value,
)

logger = logging.getLogger(__name__)

# Slack re-sends an unacknowledged event three times within about five minutes; an hour covers
# that (and slow replicas) with room to spare while keeping the key count small.
DEFAULT_CLAIM_TTL_S = 3600
# An event's lease while it is answered, renewed every third of it: a replica that dies
# mid-answer frees the event for Slack's next retry (the first comes about a minute later).
DEFAULT_LEASE_S = 30.0
TURN_POLL_S = 0.05  # how often a question waiting for another replica's turn looks again
AUDIT_KEEP = 200

P = ParamSpec("P")
R = TypeVar("R")


def _store_errors(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """RedisError (and the OS errors a dead socket raises) → StoreError, keeping the cause."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


# The hash of collection -> version that bot.knowledge.store bumps on every change.
KB_VERSIONS_KEY = "sb:kb:versions"


def history_key(key: ConversationKey) -> str:
    suffix = f":{key.thread}" if key.thread else ""
    return f"sb:{key.channel_tag}:history{suffix}"


def settings_key(key: ConversationKey) -> str:
    return f"sb:{key.channel_tag}:settings"


def audit_key(key: ConversationKey) -> str:
    return f"sb:{key.channel_tag}:settings:log"


def claim_key(platform: str, event_id: str) -> str:
    return f"sb:event:{platform}:{event_id}"


def turn_key(key: ConversationKey) -> str:
    """The lease on a conversation's turn, held by the replica answering in it."""
    suffix = f":{key.thread}" if key.thread else ""
    return f"sb:{key.channel_tag}:turn{suffix}"


def answered_key(key: ConversationKey, unit: str) -> str:
    """Whom the bot last answered in a thread (or a channel without threads): follow-ups."""
    return f"sb:{key.channel_tag}:answered:{unit}"


def answer_key(key: ConversationKey, answer_id: str) -> str:
    return f"sb:{key.channel_tag}:answer:{answer_id}"


def votes_key(key: ConversationKey, answer_id: str) -> str:
    return f"sb:{key.channel_tag}:answer:{answer_id}:votes"


def questions_key(key: ConversationKey, hour: int) -> str:
    """The channel's question count in one hour (`supportbot report`)."""
    return f"sb:{key.channel_tag}:questions:{hour}"


def handoff_key(key: ConversationKey, thread: str) -> str:
    return f"sb:{key.channel_tag}:handoff:{thread}"


def _instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RedisStore:
    def __init__(
        self,
        redis: Redis,
        *,
        defaults: SamplingSettings,
        max_new_tokens_limit: int,
        max_messages: int = 40,
        ttl_seconds: int = 7 * 24 * 3600,
        claim_ttl_s: int = DEFAULT_CLAIM_TTL_S,
        lease_s: float = DEFAULT_LEASE_S,
        owner: str | None = None,
        knowledge_defaults: KnowledgeChoice | None = None,
        answer_ttl_s: int = 30 * 24 * 3600,
    ) -> None:
        self.redis = redis
        self._defaults = defaults
        self.knowledge_defaults = knowledge_defaults or KnowledgeChoice()
        self._limit = max_new_tokens_limit
        self.max_messages = max_messages
        self.ttl_seconds = ttl_seconds
        self.claim_ttl_s = claim_ttl_s
        self.answer_ttl_s = answer_ttl_s  # how long votes can still be given (and counted)
        self.lease_s = lease_s
        # Stored as a claim's value, so an operator can see which replica took an event.
        self.owner = owner or _instance_name()

    @property
    def defaults(self) -> SamplingSettings:
        return self._defaults

    @property
    def max_new_tokens_limit(self) -> int:
        return self._limit

    async def aclose(self) -> None:
        await self.redis.aclose()

    @_store_errors
    async def ping(self) -> None:
        await self.redis.ping()

    # -- turns ------------------------------------------------------------------------------

    @_store_errors
    async def start_turn(
        self,
        key: ConversationKey,
        question: Message,
        thread: str | None = None,
        asker: str | None = None,
    ) -> Turn:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.exists(handoff_key(key, thread or ""))
            pipe.hgetall(settings_key(key))
            pipe.eval(_ASK, 1, history_key(key), question.encode(), self.max_messages,
                      self.ttl_seconds)  # fmt: skip
            pipe.lrange(history_key(key), 0, -1)
            # The knowledge base's versions ride along, so a process notices new documents
            # without another round trip (bot.knowledge.store).
            pipe.hgetall(KB_VERSIONS_KEY)
            # For `supportbot report` and follow-ups, in the same round trip (and slot: the
            # channel's tag): the question's hour count, and whom the bot answers in the thread.
            counter = questions_key(key, int(time.time() // 3600))
            pipe.hincrby(counter, "questions", 1)
            pipe.expire(counter, self.answer_ttl_s)
            if thread and asker:
                pipe.set(answered_key(key, thread), asker, ex=self.ttl_seconds)
            results = await pipe.execute()
        handed_off = bool(thread) and bool(results[0])
        # exists, hgetall, eval, lrange, hgetall, …
        settings, stored, history_raw, versions_raw = results[1:5]
        history = [Message.decode(item) for item in history_raw]
        versions = {_text(k) or "": int(v) for k, v in versions_raw.items()}
        if handed_off and stored:  # a human has the thread: not the bot's question (2nd trip)
            await self.redis.lrem(history_key(key), -1, question.encode())
        return Turn(self._settings(settings), history[:-1], versions, handed_off, bool(stored))

    @_store_errors
    async def open_handoff(
        self, key: ConversationKey, answer_id: str, thread: str
    ) -> AnswerRecord | None:
        keys = [answer_key(key, answer_id), handoff_key(key, thread)]
        raw = await self.redis.eval(_HANDOFF, 2, *keys, answer_id)
        if not raw:
            return None
        question, backend, asker, at = (_text(v) or "" for v in raw)
        return AnswerRecord(answer_id, question, backend, asker, float(at or 0))

    @_store_errors
    async def close_handoff(self, key: ConversationKey, thread: str) -> bool:
        return bool(await self.redis.delete(handoff_key(key, thread)))

    @_store_errors
    async def finish_turn(
        self, key: ConversationKey, answer: Message, record: AnswerRecord | None = None
    ) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_push(pipe, key, [answer])
            if record is not None:  # same slot (the channel's tag): one round trip still
                name = answer_key(key, record.answer_id)
                pipe.hset(name, mapping={
                    "question": record.question, "backend": record.backend,
                    "asker": record.asker, "at": f"{record.at:.3f}",
                    "thread": key.thread or "", "no_passage": int(record.no_passage),
                    "first_token_s": "" if record.first_token_s is None
                    else f"{record.first_token_s:.4f}",
                })  # fmt: skip
                pipe.expire(name, self.answer_ttl_s)
            await pipe.execute()

    @_store_errors
    async def vote(
        self, key: ConversationKey, answer_id: str, user: str, vote: Vote, at: float
    ) -> bool:
        keys = [answer_key(key, answer_id), votes_key(key, answer_id)]
        stored = await self.redis.eval(_VOTE, 2, *keys, user, f"{vote}:{at:.3f}")
        return bool(stored)

    @_store_errors
    async def report_data(self, since: float) -> tuple[dict[Where, int], list[AnswerRow]]:
        """Question counts (by the hour, from the hour of `since`) and the answers since then,
        with their votes, of every channel. An operator's command: it scans the key space."""
        questions: dict[Where, int] = {}
        first_hour = int(since // 3600)
        counters = [k async for k in self.redis.scan_iter(match="sb:{*}:questions:*", count=1000)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in counters:
                pipe.hget(name, "questions")
            counts = await pipe.execute()
        for name, count in zip(counters, counts, strict=True):
            where, hour = _where(name), int((_text(name) or "").rsplit(":", 1)[1])
            if hour >= first_hour and count is not None:
                questions[where] = questions.get(where, 0) + int(count)
        names = [
            k
            async for k in self.redis.scan_iter(match="sb:{*}:answer:*", count=1000)
            if not (_text(k) or "").endswith(":votes")
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
                pipe.hvals(f"{_text(name)}:votes")
            raw = await pipe.execute()
        rows = []
        for name, record, votes in zip(names, raw[::2], raw[1::2], strict=True):
            fields = {_text(k): _text(v) or "" for k, v in record.items()}
            if not fields or float(fields.get("at") or 0) < since:
                continue
            cast_votes = [(_text(v) or "").split(":", 1)[0] for v in votes]
            first = fields.get("first_token_s") or ""
            rows.append(AnswerRow(
                _where(name), fields.get("question", ""), fields.get("backend", ""),
                float(fields["at"]), float(first) if first else None,
                fields.get("no_passage") == "1", fields.get("handoff") == "1",
                cast_votes.count("up"), cast_votes.count("down"),
            ))  # fmt: skip
        return questions, rows

    @_store_errors
    async def votes(self, key: ConversationKey, answer_id: str) -> dict[str, Vote]:
        raw = await self.redis.hgetall(votes_key(key, answer_id))
        return {
            _text(user) or "": "up" if (_text(value) or "").startswith("up:") else "down"
            for user, value in raw.items()
        }

    @_store_errors
    async def withdraw(self, key: ConversationKey, question: Message) -> None:
        # The newest copy: turns of a conversation run one at a time, so it is this turn's.
        await self.redis.lrem(history_key(key), -1, question.encode())

    @_store_errors
    async def history(self, key: ConversationKey) -> list[Message]:
        """The stored history (operators and tests; turns read it through start_turn)."""
        raw = await self.redis.lrange(history_key(key), 0, -1)
        return [Message.decode(item) for item in raw]

    @_store_errors
    async def append(self, key: ConversationKey, *messages: Message) -> None:
        """Add messages to a history as they are (imports, tests)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_push(pipe, key, messages)
            await pipe.execute()

    def _queue_push(
        self, pipe: Pipeline, key: ConversationKey, messages: Sequence[Message]
    ) -> None:
        name = history_key(key)
        pipe.rpush(name, *(m.encode() for m in messages))
        pipe.ltrim(name, -self.max_messages, -1)
        pipe.expire(name, self.ttl_seconds)

    @_store_errors
    async def forget(self, key: ConversationKey, user: str) -> int:
        pattern = f"sb:{_escape_glob(key.channel_tag)}:history*"
        keys = [k async for k in self.redis.scan_iter(match=pattern, count=500)]
        async with self.redis.pipeline(transaction=True) as pipe:
            if keys:
                pipe.delete(*keys)
            self._audit(pipe, key, AuditEntry(user, "forget", {}, time.time()))
            results = await pipe.execute()
        return int(results[0]) if keys else 0

    # -- settings ---------------------------------------------------------------------------

    @_store_errors
    async def channel_settings(self, key: ConversationKey) -> ChannelSettings:
        return self._settings(await self.redis.hgetall(settings_key(key)))

    @_store_errors
    async def change_settings(
        self, key: ConversationKey, user: str, values: Mapping[str, SettingValue]
    ) -> ChannelSettings:
        """Store all of `values` at once, with an audit entry of old → new."""
        name = settings_key(key)
        after: dict[str, SettingValue] = {}

        async def apply(pipe: Pipeline) -> None:
            old = self._decode(await pipe.hgetall(name))
            changes = {
                k: (_shown(old.get(k)), format_value(v))
                for k, v in values.items()
                if old.get(k) != v
            }
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.hset(name, mapping={k: format_value(v) for k, v in values.items()})
            if changes:
                self._audit(pipe, key, AuditEntry(user, "set", changes, time.time()))
            after.clear()
            after.update(old, **values)

        await self.redis.transaction(apply, name)
        return self._channel(after)

    @_store_errors
    async def reset_settings(self, key: ConversationKey, user: str) -> ChannelSettings:
        name = settings_key(key)

        async def apply(pipe: Pipeline) -> None:
            old = self._decode(await pipe.hgetall(name))
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.delete(name)
            changes = {k: (format_value(v), None) for k, v in old.items()}
            self._audit(pipe, key, AuditEntry(user, "reset", changes, time.time()))

        await self.redis.transaction(apply, name)
        return self._channel({})

    @_store_errors
    async def settings_log(self, key: ConversationKey, limit: int = 20) -> list[AuditEntry]:
        raw = await self.redis.lrange(audit_key(key), 0, limit - 1)
        return [AuditEntry.decode(item) for item in raw]

    def _audit(self, pipe: Pipeline, key: ConversationKey, entry: AuditEntry) -> None:
        name = audit_key(key)
        pipe.lpush(name, entry.encode())
        pipe.ltrim(name, 0, AUDIT_KEEP - 1)

    def _settings(self, raw: Mapping[bytes | str, bytes | str]) -> ChannelSettings:
        return self._channel(self._decode(raw))

    def _channel(self, overrides: dict[str, SettingValue]) -> ChannelSettings:
        return ChannelSettings(
            self._defaults.with_overrides(overrides),
            overrides,
            self.knowledge_defaults.with_overrides(overrides),
        )

    def _decode(self, raw: Mapping[bytes | str, bytes | str]) -> dict[str, SettingValue]:
        overrides: dict[str, SettingValue] = {}
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else k
            text = v.decode() if isinstance(v, bytes) else v
            if key not in KEYS:
                continue
            try:
                overrides[key] = parse_value(key, text, self._limit)
            except SettingsError:
                # E.g. the operator lowered LLM_MAX_NEW_TOKENS_LIMIT below a stored value.
                logger.warning("ignoring stored %s=%r: out of range now", key, text)
        return overrides

    # -- events and threads -----------------------------------------------------------------

    @_store_errors
    async def claim(
        self, platform: str, *ids: str, conversation: ConversationKey | None = None
    ) -> str | None:
        """A lease on an event: its token when this caller won every id, else None.

        The lease lasts `lease_s` unless renewed (`renew`, while the answer is produced) and
        becomes a done mark for `claim_ttl_s` once the answer is delivered (`complete`). A
        replica that dies mid-answer stops renewing, so the next delivery of the event, to
        any replica, wins it again once the lease has expired.

        With `conversation`, the same round trip also leases the conversation's turn (the
        same token): a won event whose conversation is in another replica's turn waits for
        that turn to end (or its lease to expire), so replicas cannot interleave a
        conversation's questions and answers. `complete` ends the turn.

        Several ids name one event when the platform sends it in more than one form (Slack's
        `app_mention` and `message` for one message have different event ids but the same
        channel and ts). All keys are set in one script, so of two racing copies exactly one
        wins them all, and a retry of a claim that did run finds its own token and still
        wins. (The keys carry no hash tag: on Redis Cluster the ids of one claim would need
        one in common; the bot's client is a single-node one.)"""
        if not ids:
            raise ValueError("claim needs at least one id")
        token = f"{self.owner}:{secrets.token_hex(8)}"
        keys = _lease_keys(platform, ids, conversation)
        won = int(
            await self.redis.eval(
                _CLAIM, len(keys), *keys, token, round(self.lease_s * 1000), len(ids)
            )
        )
        if won < 0:
            return None
        if won == 0:  # the event is ours, the conversation is in another replica's turn
            await self._wait_for_turn(keys[-1], token, keys[:-1])
        return token

    async def _wait_for_turn(self, turn: str, token: str, names: list[str]) -> None:
        """Poll until the conversation's turn is ours, keeping the event's lease meanwhile."""
        lease_ms = round(self.lease_s * 1000)
        while True:
            await asyncio.sleep(TURN_POLL_S)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(turn, token, nx=True, px=lease_ms)
                for name in names:
                    pipe.pexpire(name, lease_ms)
                results = await pipe.execute()
            if results[0]:
                return

    @_store_errors
    async def renew(
        self,
        platform: str,
        ids: Sequence[str],
        token: str,
        conversation: ConversationKey | None = None,
    ) -> bool:
        """Extend a lease (and its conversation turn) still held by `token` by `lease_s`;
        False when it was lost."""
        keys = _lease_keys(platform, ids, conversation)
        held = await self.redis.eval(_RENEW, len(keys), *keys, token, round(self.lease_s * 1000))
        return int(held) == len(keys)

    @_store_errors
    async def complete(
        self,
        platform: str,
        ids: Sequence[str],
        token: str,
        conversation: ConversationKey | None = None,
    ) -> None:
        """The answer was delivered: the lease becomes a done mark that outlives re-deliveries,
        and the conversation's turn (if leased) passes on. One round trip."""
        keys = _lease_keys(platform, ids, conversation)
        await self.redis.eval(
            _COMPLETE, len(keys), *keys, token, f"done:{token}", self.claim_ttl_s, len(ids)
        )

    @_store_errors
    async def release(
        self,
        platform: str,
        ids: Sequence[str],
        token: str,
        conversation: ConversationKey | None = None,
    ) -> None:
        """The answer was not delivered (cut at shutdown): the event's lease and the turn are
        let go now, not when they expire. One round trip."""
        keys = _lease_keys(platform, ids, conversation)
        await self.redis.eval(_COMPLETE, len(keys), *keys, token, "", 0, 0)

    @_store_errors
    async def may_follow_up(self, key: ConversationKey, user: str) -> bool:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(answered_key(key, key.thread or key.channel))
            pipe.exists(handoff_key(key, key.thread or key.channel))
            asker, handed_off = await pipe.execute()
        return _text(asker) == user and not handed_off


# A question joins its history unless it is the history's last message already: asked again
# after its answer failed, or re-delivered after the replica answering it died, it is kept once.
_ASK = """
if redis.call('LINDEX', KEYS[1], -1) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Lease scripts: touch a key only while it still holds our token (a lease that expired may
# already be another replica's).
# Claim: all of the event's keys or none (a copy racing with another cannot split them), and
# the conversation's turn when it is free. -1: lost; 0: won, the turn is taken; 1: won both.
_CLAIM = """
local n = tonumber(ARGV[3])
for i = 1, n do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= ARGV[1] then
    return -1
  end
end
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
if #KEYS > n then
  local holder = redis.call('GET', KEYS[n + 1])
  if holder and holder ~= ARGV[1] then
    return 0
  end
  redis.call('SET', KEYS[n + 1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""
_RENEW = """
local held = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held = held + 1
  end
end
return held
"""
# A vote counts only while its answer is stored; the votes live as long as the answer.
_VOTE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
# A hand-off starts from an answer still stored; it lasts as long as that answer's record.
_HANDOFF = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  return false
end
redis.call('HSET', KEYS[1], 'handoff', 1)
redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
return redis.call('HMGET', KEYS[1], 'question', 'backend', 'asker', 'at')
"""
# Complete (ARGV[4] event keys become done marks, the rest are deleted) and release (none).
_COMPLETE = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    if i <= tonumber(ARGV[4]) then
      redis.call('SET', key, ARGV[2], 'EX', ARGV[3])
    else
      redis.call('DEL', key)
    end
  end
end
return 0
"""


def _lease_keys(
    platform: str, ids: Sequence[str], conversation: ConversationKey | None
) -> list[str]:
    """An event's claim keys, then its conversation's turn key when the lease holds it too."""
    keys = [claim_key(platform, event_id) for event_id in ids]
    if conversation is not None:
        keys.append(turn_key(conversation))
    return keys


def _where(name: bytes | str) -> Where:
    """(platform, workspace, channel) from a key's hash tag."""
    tag = (_text(name) or "").split("{", 1)[1].split("}", 1)[0]
    platform, workspace, channel = tag.split(":", 2)
    return platform, workspace, channel


def _shown(value: SettingValue | None) -> str | None:
    return None if value is None else format_value(value)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
