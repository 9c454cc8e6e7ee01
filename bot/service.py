"""SupportService: the one path every front door (Slack, Discord, the terminal) goes through.

`ask()` streams an answer for a conversation; `settings()` answers /llm-settings. Turns of one
conversation run in arrival order (the FIFO lock is the first thing a turn awaits, so a front door
that starts its turns in arrival order keeps them in order); different conversations run
concurrently. Storage is the `Store` interface and the models are the LLM chain: this module
imports neither Redis nor a model library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from bot.conversation import (
    AnswerRecord,
    ConversationKey,
    HistoryScope,
    Message,
    Store,
    StoreError,
    TurnLocks,
    Vote,
)
from bot.handoff import HANDED_OFF_NOTE, Handoff, summarise
from bot.knowledge.cite import NO_DOCUMENTED_ANSWER, Sources, cited_sources
from bot.knowledge.passages import Passage
from bot.llm.base import (
    BackendBusy,
    BackendTimeout,
    Delta,
    Finished,
    LLMError,
)
from bot.llm.chain import NoBackendAvailable
from bot.messages import no_backend_message
from bot.ops.logging import correlation_id, new_correlation_id
from bot.ports import Knowledge, Models, Observer, Unobserved
from bot.prompt import PromptTooLong, build_grounded
from bot.settings_command import SettingsCommand

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
    # For metrics: redis, too_long, rejected, rate_limited, timeout, circuit_open, busy, failed,
    # empty, no_backend, not_configured; "notice" (shortened) for plain notices.
    reason: str = "notice"


@dataclass(frozen=True, slots=True)
class Answered:
    """Just before Finished: the stored answer's id, which the platforms attach to its 👍/👎
    controls."""

    answer_id: str


AnswerEvent = Delta | Finished | Failure | Sources | Answered
VOTE_THANKS = "Thanks for your feedback! It helps us improve these answers."
VOTE_GONE = (
    "That answer is no longer on record (answers are kept for a limited time), "
    "so your vote was not counted. Nothing was changed."
)
# Called once the turn's place in its conversation has come; False: not to be answered (a
# duplicate delivery, say), and the turn ends without a word.
Admit = Callable[[], Awaitable[bool]]


def new_error_id() -> str:
    """An id for an error the user sees: the current answer's correlation id, so the message
    and every log line of that answer share it (a fresh one outside an answer)."""
    return correlation_id() or new_correlation_id()


def clean_question(text: str) -> str:
    """Drop control characters (keeping newlines and tabs), replace lone surrogates (which
    cannot be stored as UTF-8) with `?`, trim, and cut to MAX_QUESTION_CHARS. Text with nothing
    visible in it (only whitespace and format characters such as zero-width spaces or direction
    marks) is empty."""
    return _cleaned(text)[:MAX_QUESTION_CHARS]


def _cleaned(text: str) -> str:
    """clean_question without the cut (its length tells whether the question was shortened)."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    kept = (ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs"))
    question = "".join(kept).strip()
    if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in question):
        return ""
    return question


class SupportService:
    def __init__(
        self,
        *,
        store: Store,
        llm: Models,
        persona: str,
        scope: HistoryScope = "channel",
        observer: Observer | None = None,
        knowledge: Knowledge | None = None,
        kb_top_k: int = 4,
    ) -> None:
        self.store = store
        self.knowledge = knowledge
        self.kb_top_k = kb_top_k
        self.llm = llm
        self.persona = persona
        self.scope = scope
        self._observer = observer or Unobserved()
        self._locks = TurnLocks()
        self._settings = SettingsCommand(store, llm, knowledge)

    @property
    def active_conversations(self) -> int:
        return len(self._locks)

    async def ask(
        self, key: ConversationKey, user: User, text: str, *, admit: Admit | None = None
    ) -> AsyncIterator[AnswerEvent]:
        """Answer `text`. The turn's FIFO lock is the first await; `admit` (a front door's
        exactly-once claim) runs under it, so its round trips cannot reorder a channel's turns."""
        conversation = key.scoped(self.scope)
        async with self._locks.hold(conversation):
            if admit is not None and not await admit():
                return
            full = _cleaned(text)
            question = full[:MAX_QUESTION_CHARS]
            if not question:
                yield Failure("Ask me a question after the mention, and I'll answer here.")
                return
            self._observer.question(key.platform)
            # A fresh correlation id per turn, in the caller's context: log lines of this answer
            # (the platform adapter's included) and its error message carry the same id.
            new_correlation_id()
            if len(full) > len(question):
                yield _shortened_notice(conversation, len(full))
            self._observer.active(+1)
            try:
                async for event in self._turn(conversation, question, user, _unit(key)):
                    if isinstance(event, Failure) and event.error_id:
                        self._observer.failed(key.platform, event.reason)
                    yield event
            finally:
                self._observer.active(-1)

    async def _turn(
        self, conversation: ConversationKey, question: str, user: User, thread: str | None
    ) -> AsyncIterator[AnswerEvent]:
        started = time.monotonic()
        asked = Message("user", question)
        try:
            turn = await self.store.start_turn(conversation, asked, thread, user.id)
        except StoreError as exc:
            yield self._fail(
                "I couldn't reach my conversation store, so I didn't answer. "
                "Please try again in a minute.",
                "store error starting a turn in %s: %s",
                conversation.describe(),
                exc,
                reason="redis",
            )
            return

        if turn.handed_off:
            yield Failure(HANDED_OFF_NOTE, reason="handed_off")
            return
        sampling = turn.settings.effective
        choice = turn.settings.knowledge
        passages = []
        if choice.mode != "off":
            passages = await self._passages(
                conversation, question, choice.collection, turn.kb_versions
            )
        if choice.mode == "strict" and not passages:
            # No relevant passage: the model is not asked (it would guess).
            # Recorded (no backend) for the report's "without a passage" and its question list;
            # its id gives the reply the same controls ("Ask a human" among them).
            record = AnswerRecord(
                secrets.token_hex(8), question, "", user.id, time.time(), no_passage=True
            )
            self._observer.no_passage(conversation.platform)
            try:
                await self.store.finish_turn(
                    conversation, Message("assistant", NO_DOCUMENTED_ANSWER), record
                )
                yield Answered(record.answer_id)
            except StoreError:
                pass
            yield Failure(NO_DOCUMENTED_ANSWER, reason="no_passage")
            return
        try:
            grounded = await asyncio.to_thread(
                build_grounded,
                self.persona,
                turn.history,
                question,
                encoder=self.llm,
                context_window=self.llm.context_window,
                max_new_tokens=sampling.max_new_tokens,
                passages=passages,
            )
            prompt = grounded.prompt
        except PromptTooLong as exc:
            # Refused before any model saw it: it must not crowd out the history of later turns.
            if turn.question_stored:
                with contextlib.suppress(StoreError):
                    await self.store.withdraw(conversation, asked)
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
            async with aclosing(self.llm.stream(prompt, sampling)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, Delta):
                        parts.append(event.text)
                        yield event
                    else:
                        record = AnswerRecord(
                            secrets.token_hex(8), question, event.backend, user.id, time.time(),
                            event.first_token_s, no_passage=choice.mode != "off" and not passages,
                        )  # fmt: skip
                        if record.no_passage:
                            self._observer.no_passage(conversation.platform)
                        text = "".join(parts)
                        done = await self._finish(conversation, text, event, started, record)
                        sources = cited_sources(text, grounded.passages)
                        if isinstance(done, Finished):  # Finished stays the last event
                            yield Answered(record.answer_id)
                            if sources is not None:
                                yield sources
                        yield done
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
            what, reason = (
                ("Sorry, the model stopped responding.", "timeout")
                if isinstance(exc, BackendTimeout)
                else ("Sorry, the model failed while answering.", "failed")
            )
            yield self._fail(
                f"{what}{cut} Please try again.",
                "generation failed in %s: %s",
                conversation.describe(),
                exc,
                reason=reason,
            )
        except StoreError as exc:
            yield self._fail(
                "I answered, but couldn't save the answer to this conversation's history.",
                "store error saving an answer in %s: %s",
                conversation.describe(),
                exc,
                reason="redis",
            )

    async def _passages(
        self, conversation: ConversationKey, question: str, collection: str,
        versions: Mapping[str, int],
    ) -> list[Passage]:  # fmt: skip
        """The relevant passages, best first; none when knowledge is off for the channel or the
        knowledge base fails (then the answer comes from the model alone, logged)."""
        if self.knowledge is None:
            return []
        try:
            hits = await self.knowledge.search(
                collection, question, limit=self.kb_top_k, version=versions.get(collection, 0)
            )
        except Exception:
            logger.exception("knowledge search failed in %s", conversation.describe())
            return []
        return [hit.passage for hit in hits]

    async def _finish(
        self,
        conversation: ConversationKey,
        text: str,
        done: Finished,
        started: float,
        record: AnswerRecord,
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
        await self.store.finish_turn(conversation, Message("assistant", answer), record)
        rate = None
        if done.first_token_s is not None:
            decoding_s = done.total_s - done.first_token_s
            if done.completion_tokens > 1 and decoding_s > 0:
                rate = (done.completion_tokens - 1) / decoding_s
        total_s = time.monotonic() - started
        self._observer.answered(
            conversation.platform, done.backend, total_s, done.first_token_s, rate
        )
        logger.info(
            "answered in %s by %s: %d+%d tokens, first text %.3fs, total %.3fs",
            conversation.describe(),
            done.backend,
            done.prompt_tokens,
            done.completion_tokens,
            done.first_token_s or 0.0,
            total_s,
        )
        return done

    def _no_backend(self, conversation: ConversationKey, exc: NoBackendAvailable) -> Failure:
        """What happened, by the typed reason the chain gives, and what the user can do."""
        message, reason = no_backend_message(exc)
        return self._fail(
            message,
            "no backend could answer in %s: %s",
            conversation.describe(),
            exc,
            reason=reason,
        )

    @staticmethod
    def _fail(message: str, log: str, *args: object, reason: str) -> Failure:
        # The turn's correlation id: every log line of this answer carries it too.
        error_id = new_error_id()
        logger.error("[error_id=%s] " + log, error_id, *args)
        return Failure(f"{message} (error id: {error_id})", error_id, reason)

    # -- feedback ---------------------------------------------------------------------------

    async def feedback(self, key: ConversationKey, answer_id: str, user: User, vote: Vote) -> str:
        """Record a 👍/👎 on an answer of the channel of `key`; the reply is for the voter only."""
        try:
            stored = await self.store.vote(key, answer_id, user.id, vote, time.time())
        except StoreError as exc:
            return self._fail(
                "I couldn't reach my store, so your vote was not recorded. Please try again.",
                "store error recording a vote in %s: %s",
                key.describe(),
                exc,
                reason="redis",
            ).message
        if not stored:
            logger.info("vote on unknown answer %s in %s", answer_id, key.describe())
            return VOTE_GONE
        logger.info("%s vote on answer %s in %s", vote, answer_id, key.describe())
        self._observer.voted(key.platform, vote)
        return VOTE_THANKS

    # -- hand-off to a human ----------------------------------------------------------------

    async def handoff(self, key: ConversationKey, answer_id: str) -> Handoff | None:
        """Hand the thread of `key` (its channel where there are no threads: a Discord thread is
        a channel) to a human, from one of its answers: the bot stays out of it
        until `resolve()`. None, and nothing changed, when that answer is no longer stored.
        Raises StoreError."""
        record = await self.store.open_handoff(key, answer_id, _unit(key))
        if record is None:
            return None
        logger.info("thread %s handed off to a human", key.describe())
        self._observer.handed_off(key.platform)
        conversation = key.scoped(self.scope)
        history = await self.store.history(conversation)
        summary = await summarise(self.llm, history, self.store.defaults)
        return Handoff(record.question, record.asker, summary)

    async def resolve(self, key: ConversationKey) -> bool:
        """The human is done: the bot answers in the thread of `key` again. Raises StoreError."""
        closed = await self.store.close_handoff(key, _unit(key))
        logger.info("hand-off of %s resolved (%s)", key.describe(), "closed" if closed else "none")
        return closed

    # -- /llm-settings --------------------------------------------------------------------

    async def settings(self, key: ConversationKey, user: User, args: str) -> str:
        """The reply to `/llm-settings args` in the channel of `key`."""
        try:
            return await self._settings.run(key, user.id, user.can_configure, args)
        except StoreError as exc:
            return self._fail(
                "I couldn't reach the settings store; nothing was changed. Please try again.",
                "store error in /llm-settings for %s: %s",
                key.describe(),
                exc,
                reason="redis",
            ).message


def _unit(key: ConversationKey) -> str:
    """What a hand-off covers: the thread, or the channel where the platform has no threads."""
    return key.thread or key.channel


def _shortened_notice(conversation: ConversationKey, length: int) -> Failure:
    """Said with the answer: the model saw only the first MAX_QUESTION_CHARS characters."""
    error_id = new_error_id()
    logger.warning(
        "[error_id=%s] question in %s shortened from %d to %d characters",
        error_id,
        conversation.describe(),
        length,
        MAX_QUESTION_CHARS,
    )
    return Failure(
        f"Note: your question was {length:,} characters long, so I read only its first "
        f"{MAX_QUESTION_CHARS:,}. If the rest matters, send it in a follow-up message. "
        f"(error id: {error_id})",
        reason="shortened",
    )
