"""SupportService: the one path every front door (Slack, Discord, the terminal) goes through.

`ask()` streams an answer for a conversation; `settings()` answers /llm-settings. Turns of one
conversation run in arrival order; different conversations run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
import unicodedata
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.conversation import ConversationKey, HistoryScope, HistoryStore, Message
from bot.llm.base import BackendBusy, Delta, Finished, LLMError
from bot.llm.fallback import FallbackLLM, NoBackendAvailable
from bot.ops import metrics
from bot.ops.logging import correlation_id, new_correlation_id
from bot.prompt import PromptTooLong, build_prompt
from bot.sampling import (
    KEYS,
    AuditEntry,
    Change,
    ChannelSettings,
    Forget,
    Log,
    Reset,
    SettingsError,
    SettingsStore,
    Show,
    format_value,
    parse_command,
)

logger = logging.getLogger(__name__)

# A question longer than this is cut before it is stored or sent (Slack allows 40,000 chars).
MAX_QUESTION_CHARS = 16_000


@dataclass(frozen=True, slots=True)
class User:
    id: str
    name: str | None = None
    can_configure: bool = False  # decided by the platform adapter (admins list, role, …)


@dataclass(frozen=True, slots=True)
class Failure:
    """Something the user should be told instead of (or after part of) an answer."""

    message: str
    error_id: str | None = None  # matches the log line; None for plain notices
    reason: str = "notice"  # for metrics: redis, too_long, busy, failed, empty, no_backend


AnswerEvent = Delta | Finished | Failure


def new_error_id() -> str:
    """An id for an error the user sees: the current answer's correlation id, so the message
    and every log line of that answer share it (a fresh one outside an answer)."""
    return correlation_id() or new_correlation_id()


def clean_question(text: str) -> str:
    """Drop control characters (keeping newlines and tabs), replace lone surrogates (which
    cannot be stored as UTF-8) with `?`, and trim. Text with nothing visible in it (only
    whitespace and format characters such as zero-width spaces or direction marks) is empty."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    kept = (ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs"))
    question = "".join(kept).strip()[:MAX_QUESTION_CHARS]
    if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in question):
        return ""
    return question


class _TurnLocks:
    """One FIFO lock per conversation, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[ConversationKey, tuple[asyncio.Lock, int]] = {}

    def hold(self, key: ConversationKey) -> _Held:
        return _Held(self, key)

    def acquire_ref(self, key: ConversationKey) -> asyncio.Lock:
        lock, refs = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, refs + 1)
        return lock

    def release_ref(self, key: ConversationKey) -> None:
        lock, refs = self._locks[key]
        if refs <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, refs - 1)

    def __len__(self) -> int:
        return len(self._locks)


class _Held:
    def __init__(self, locks: _TurnLocks, key: ConversationKey) -> None:
        self._locks = locks
        self._key = key
        self._lock: asyncio.Lock | None = None

    async def __aenter__(self) -> None:
        self._lock = self._locks.acquire_ref(self._key)
        try:
            await self._lock.acquire()
        except BaseException:
            self._locks.release_ref(self._key)
            raise

    async def __aexit__(self, *exc: object) -> None:
        assert self._lock is not None
        self._lock.release()
        self._locks.release_ref(self._key)


class SupportService:
    def __init__(
        self,
        *,
        redis: Redis,
        history: HistoryStore,
        settings: SettingsStore,
        llm: FallbackLLM,
        persona: str,
        scope: HistoryScope = "channel",
    ) -> None:
        self._redis = redis
        self.history = history
        self.channel_settings = settings
        self.llm = llm
        self.persona = persona
        self.scope = scope
        self._locks = _TurnLocks()

    @property
    def active_conversations(self) -> int:
        return len(self._locks)

    async def ask(self, key: ConversationKey, user: User, text: str) -> AsyncIterator[AnswerEvent]:
        question = clean_question(text)
        if not question:
            yield Failure("Ask me a question after the mention, and I'll answer here.")
            return
        conversation = key.scoped(self.scope)
        metrics.QUESTIONS.labels(key.platform).inc()
        # A fresh correlation id per turn, in the caller's context: log lines of this answer
        # (the platform adapter's included) and its error message carry the same id.
        new_correlation_id()
        async with self._locks.hold(conversation):
            metrics.ACTIVE.inc()
            try:
                async for event in self._turn(conversation, user, question):
                    if isinstance(event, Failure) and event.error_id:
                        metrics.ERRORS.labels(key.platform, event.reason).inc()
                    yield event
            finally:
                metrics.ACTIVE.dec()

    async def _turn(
        self, conversation: ConversationKey, user: User, question: str
    ) -> AsyncIterator[AnswerEvent]:
        started = time.monotonic()
        try:
            channel, history = await self._start_turn(conversation, question)
        except RedisError as exc:
            yield self._fail(
                "I couldn't reach my conversation store, so I didn't answer. "
                "Please try again in a minute.",
                "redis error starting a turn in %s: %s",
                conversation.describe(),
                exc,
                reason="redis",
            )
            return

        sampling = channel.effective
        try:
            messages = build_prompt(
                self.persona,
                history,
                question,
                count_tokens=self.llm.count_tokens,
                context_window=self.llm.context_window,
                max_new_tokens=sampling.max_new_tokens,
            )
        except PromptTooLong as exc:
            yield self._fail(
                f"Your question is too long for the model ({exc.needed} tokens; "
                f"{exc.budget} fit with room for the answer). Please shorten it "
                "or lower max_new_tokens with /llm-settings.",
                "prompt too long in %s: %s",
                conversation.describe(),
                exc,
                reason="too_long",
            )
            return
        except NoBackendAvailable as exc:
            yield self._no_backend(conversation, exc)
            return

        parts: list[str] = []
        try:
            # aclosing: leaving at Finished must close the backend's stream now, not at GC.
            async with aclosing(self.llm.stream(messages, sampling)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        parts.append(event.text)
                        yield event
                    else:
                        yield await self._finish(conversation, "".join(parts), event, started)
                        return
        except NoBackendAvailable as exc:
            yield self._no_backend(conversation, exc)
        except BackendBusy as exc:
            yield self._fail(
                f"The model is busy: {exc.waiting} questions are ahead of yours. "
                "Please ask again in a minute.",
                "local model at capacity in %s: %s",
                conversation.describe(),
                exc,
                reason="busy",
            )
        except LLMError as exc:
            cut = " The answer above was cut off." if parts else ""
            yield self._fail(
                f"Sorry, the model failed while answering.{cut} Please try again.",
                "generation failed in %s: %s",
                conversation.describe(),
                exc,
                reason="failed",
            )
        except RedisError as exc:
            yield self._fail(
                "I answered, but couldn't save the answer to this conversation's history.",
                "redis error storing an answer in %s: %s",
                conversation.describe(),
                exc,
                reason="redis",
            )

    async def _finish(
        self, conversation: ConversationKey, text: str, done: Finished, started: float
    ) -> Finished | Failure:
        answer = text.strip()
        if not answer:
            return self._fail(
                "The model returned an empty answer. Please rephrase your question.",
                "empty answer from %s in %s",
                done.backend,
                conversation.describe(),
                reason="empty",
            )
        await self.history.append(conversation, Message("assistant", answer))
        labels = (conversation.platform, done.backend)
        metrics.ANSWERS.labels(*labels).inc()
        metrics.LATENCY.labels(*labels).observe(time.monotonic() - started)
        if done.first_token_s is not None:
            metrics.FIRST_TOKEN.labels(*labels).observe(done.first_token_s)
            decoding_s = done.total_s - done.first_token_s
            if done.completion_tokens > 1 and decoding_s > 0:
                rate = (done.completion_tokens - 1) / decoding_s
                metrics.TOKENS_PER_S.labels(done.backend).observe(rate)
        logger.info(
            "answered in %s by %s: %d+%d tokens, first text %.3fs, total %.3fs",
            conversation.describe(),
            done.backend,
            done.prompt_tokens,
            done.completion_tokens,
            done.first_token_s or 0.0,
            time.monotonic() - started,
        )
        return done

    async def _start_turn(
        self, conversation: ConversationKey, question: str
    ) -> tuple[ChannelSettings, list[Message]]:
        # One round trip: the channel's settings and the history, with the question stored.
        async with self._redis.pipeline(transaction=True) as pipe:
            self.channel_settings.queue_get(pipe, conversation.channel_tag)
            self.history.queue_push(pipe, conversation, [Message("user", question)], read_back=True)
            results = await pipe.execute()
        channel = self.channel_settings.from_raw(results[0])
        return channel, self.history.decode_list(results[-1])[:-1]

    def _no_backend(self, conversation: ConversationKey, exc: Exception) -> Failure:
        return self._fail(
            "No model is available to answer right now: the local model (LLM_MODEL) "
            "is disabled or failed, and the GPT fallback (OPENAI_API_KEY) is not set or "
            "failed. An operator can run `supportbot doctor` to see why.",
            "no backend could answer in %s: %s",
            conversation.describe(),
            exc,
            reason="no_backend",
        )

    @staticmethod
    def _fail(message: str, log: str, *args: object, reason: str) -> Failure:
        # The turn's correlation id: every log line of this answer carries it too.
        error_id = new_error_id()
        logger.error("[error_id=%s] " + log, error_id, *args)
        return Failure(f"{message} (error id: {error_id})", error_id, reason)

    # -- /llm-settings --------------------------------------------------------------------

    async def settings(self, key: ConversationKey, user: User, args: str) -> str:
        store = self.channel_settings
        try:
            command = parse_command(args, max_new_tokens_limit=store.max_new_tokens_limit)
        except SettingsError as exc:
            return str(exc)
        tag = key.channel_tag
        try:
            if isinstance(command, Show):
                return self._render_show(await store.get(tag))
            if isinstance(command, Log):
                return _render_log(await store.log(tag))
            if not user.can_configure:
                return (
                    "Only settings admins can change this channel's settings or forget its "
                    "history; anyone can use `/llm-settings show`. Nothing was changed."
                )
            if isinstance(command, Change):
                updated = await store.change(tag, user.id, command.values)
                changed = ", ".join(f"{k}={format_value(v)}" for k, v in command.values.items())
                return f"Updated: {changed}.\n\n" + self._render_show(updated)
            if isinstance(command, Reset):
                return "Back to the defaults.\n\n" + self._render_show(
                    await store.reset(tag, user.id)
                )
            assert isinstance(command, Forget)
            removed = await self.history.forget(key)
            await store.record(tag, AuditEntry(user.id, "forget", {}, time.time()))
            return (
                "Forgot this channel's conversation history."
                if removed
                else "There was no history to forget."
            )
        except RedisError as exc:
            return self._fail(
                "I couldn't reach the settings store; nothing was changed. Please try again.",
                "redis error in /llm-settings for %s: %s",
                key.describe(),
                exc,
                reason="redis",
            ).message

    def _render_show(self, channel: ChannelSettings) -> str:
        statuses = self.llm.status()
        answering = next((s for s in statuses if s.usable and "open" not in s.state), None)
        answering = answering or next((s for s in statuses if s.usable), None)
        lines = ["*LLM settings for this channel*"]
        for name in KEYS:
            value = getattr(channel.effective, name)
            source = "set in this channel" if name in channel.overrides else "default"
            notes = [
                f"{s.name} cannot honour it, ignored there"
                for s in statuses
                if name in s.unsupported
            ]
            if not channel.effective.do_sample and name in ("temperature", "top_k", "top_p"):
                notes.append("unused while do_sample is false (greedy)")
            note = f" — {'; '.join(notes)}" if notes else ""
            lines.append(f"• {name} = {format_value(value)} ({source}){note}")
        lines.append("")
        if answering is None:
            lines.append("Answering: no backend is available (see `supportbot doctor`).")
        else:
            lines.append(f"Answering: {answering.name}")
        for s in statuses:
            lines.append(f"• {s.role}: {s.name} — {s.state}")
        return "\n".join(lines)


def _render_log(entries: list[AuditEntry]) -> str:
    if not entries:
        return "No settings changes recorded for this channel."
    lines = ["*Recent settings changes* (newest first)"]
    for entry in entries:
        when = datetime.fromtimestamp(entry.at, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
        if entry.action == "forget":
            what = "forgot the conversation history"
        elif not entry.changes:
            what = f"{entry.action} (no change)"
        else:
            what = ", ".join(
                f"{k}: {old or 'default'} → {new or 'default'}"
                for k, (old, new) in entry.changes.items()
            )
            what = f"reset ({what})" if entry.action == "reset" else what
        lines.append(f"• {when} — {entry.user}: {what}")
    return "\n".join(lines)
