"""Slack events and the /llm-settings command → SupportService, each event answered once.

Bolt acknowledges every event before a listener runs (AsyncApp with process_before_response
False), so Slack's 3-second rule holds however long an answer takes. Listeners only decide
whether an event is a question; the answer runs as a task of our own, so shutdown can wait for
answers in flight.

Which messages are questions:
- `app_mention` in a channel: the mention's thread (its root, or the mention itself);
- a direct message (`message.im`), no mention needed;
- with HISTORY_SCOPE=thread, any message in a thread the bot has answered in (the thread is
  recorded in Redis when the bot answers there), mention or not.
Never: messages from bots (this one included), edits, deletes and other subtypes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.web.async_client import AsyncWebClient

from bot.conversation import ConversationKey
from bot.events import DEFAULT_CLAIM_TTL_S, EventClaims
from bot.ops import metrics
from bot.platforms.slack_mrkdwn import escape
from bot.platforms.slack_reply import (
    DELIVERY_ERRORS,
    SLACK_TEXT_LIMIT,
    UPDATE_INTERVAL_S,
    Features,
    Place,
    ReplyWriter,
    slack_error,
)
from bot.sampling import COMMAND
from bot.service import SupportService, User, new_error_id

logger = logging.getLogger(__name__)

PLATFORM = "slack"
# Subtypes that are still a person writing: a reply also sent to the channel, a message with a
# file. Every other subtype (edits, deletes, bot_message, joins, …) is not a question.
_USER_SUBTYPES = frozenset({None, "thread_broadcast", "file_share"})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the bot is, from auth.test at start."""

    user_id: str
    bot_id: str | None = None
    team_id: str | None = None


@dataclass(frozen=True, slots=True)
class Tuning:
    """Limits and timings; tests shrink them instead of sleeping."""

    message_limit: int = SLACK_TEXT_LIMIT
    update_interval_s: float = UPDATE_INTERVAL_S
    claim_ttl_s: int = DEFAULT_CLAIM_TTL_S
    rate_limit_retries: int = 5
    rate_limit_jitter_s: float = 1.0
    drain_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Question:
    key: ConversationKey  # thread = the thread the answer goes to
    user: str
    text: str
    claim_ids: tuple[str, ...]
    kind: str  # event type, for logs
    retry: str | None  # X-Slack-Retry-Num, when this is a re-delivery


class AnsweredThreads:
    """Threads the bot has answered in (HISTORY_SCOPE=thread), so follow-ups need no mention."""

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s  # as long as the thread's history lives

    @staticmethod
    def _key(key: ConversationKey) -> str:
        return f"sb:{key.channel_tag}:answered:{key.thread}"

    async def mark(self, key: ConversationKey) -> None:
        await self._redis.set(self._key(key), 1, ex=self._ttl_s)

    async def contains(self, key: ConversationKey) -> bool:
        return bool(await self._redis.exists(self._key(key)))


class SlackBot:
    def __init__(
        self,
        service: SupportService,
        redis: Redis,
        client: AsyncWebClient,
        identity: Identity,
        *,
        admins: frozenset[str] = frozenset(),
        history_ttl_s: int = 7 * 24 * 3600,
        tuning: Tuning | None = None,
    ) -> None:
        self.service = service
        self.client = client
        self.identity = identity
        self.tuning = tuning or Tuning()
        self._admins = admins
        self._claims = EventClaims(redis, ttl_s=self.tuning.claim_ttl_s)
        self._threads = AnsweredThreads(redis, history_ttl_s)
        self._features = Features()
        self._mention = re.compile(rf"<@{re.escape(identity.user_id)}(?:\|[^>]*)?>")
        self._tasks: set[asyncio.Task[None]] = set()
        self.received = 0  # events seen by the listeners, answered or not (tests wait on it)

    def register(self, app: AsyncApp) -> None:
        app.event("app_mention")(self._on_app_mention)
        app.event("message")(self._on_message)
        app.command(COMMAND)(self._on_settings)

    # --- listeners (run after bolt has acknowledged) ----------------------------------------

    async def _on_app_mention(self, body: dict[str, Any], request: AsyncBoltRequest) -> None:
        self.received += 1
        event = body.get("event") or {}
        if self._ignored(event) or "edited" in event:
            return
        self._start(self._answer(self._question(body, request), follow_up=False))

    async def _on_message(self, body: dict[str, Any], request: AsyncBoltRequest) -> None:
        self.received += 1
        event = body.get("event") or {}
        if self._ignored(event):
            return
        if event.get("channel_type") == "im":
            self._start(self._answer(self._question(body, request), follow_up=False))
            return
        if self._mention.search(str(event.get("text") or "")):
            return  # the app_mention event for this message answers it
        thread = event.get("thread_ts")
        if self.service.scope == "thread" and thread and thread != event.get("ts"):
            self._start(self._answer(self._question(body, request), follow_up=True))

    async def _on_settings(
        self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond
    ) -> None:
        await ack()  # within Slack's 3 s; the reply follows through response_url
        user_id = str(body.get("user_id") or "")
        key = ConversationKey(PLATFORM, str(body.get("team_id") or ""), str(body["channel_id"]))
        user = User(user_id, body.get("user_name"), can_configure=self.can_configure(user_id))
        try:
            reply = escape(await self.service.settings(key, user, str(body.get("text") or "")))
        except Exception:
            error_id = new_error_id()
            logger.exception("[error_id=%s] /llm-settings failed in %s", error_id, key.describe())
            reply = f"Sorry, the settings command failed. Please try again. (error id: {error_id})"
        await respond(text=reply, response_type="ephemeral")

    def can_configure(self, user_id: str) -> bool:
        return not self._admins or user_id in self._admins

    # --- deciding -----------------------------------------------------------------------------

    def _ignored(self, event: dict[str, Any]) -> bool:
        return bool(
            event.get("subtype") not in _USER_SUBTYPES
            or event.get("bot_id")
            or event.get("bot_profile")
            or not event.get("user")
            or event.get("user") == self.identity.user_id
        )

    def _question(self, body: dict[str, Any], request: AsyncBoltRequest) -> Question:
        event = body["event"]
        team = str(body.get("team_id") or event.get("team") or self.identity.team_id or "")
        channel = str(event["channel"])
        ts = str(event["ts"])
        thread = str(event.get("thread_ts") or ts)
        retry = request.headers.get("x-slack-retry-num", [None])[0]
        return Question(
            key=ConversationKey(PLATFORM, team, channel, thread),
            user=str(event["user"]),
            text=self._mention.sub("", str(event.get("text") or "")).strip(),
            # app_mention and message events for one message share channel and ts.
            claim_ids=(str(body.get("event_id") or f"{event['type']}:{channel}:{ts}"),
                       f"{channel}:{ts}"),
            kind=str(event.get("type")),
            retry=retry,
        )  # fmt: skip

    # --- answering ----------------------------------------------------------------------------

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, question: Question, *, follow_up: bool) -> None:
        key = question.key
        if follow_up and not await self._answered_in(key):
            return
        if not await self._claim(question):
            metrics.DUPLICATES.labels(PLATFORM).inc()
            logger.info(
                "ignoring a duplicate slack %s %s in %s (retry %s)",
                question.kind,
                question.claim_ids[0],
                key.describe(),
                question.retry or "none",
            )
            return
        if question.retry:
            logger.info(
                "answering slack re-delivery %s (retry %s) that no replica had taken",
                question.claim_ids[0],
                question.retry,
            )
        if self.service.scope == "thread":
            try:
                await self._threads.mark(key)
            except RedisError as exc:  # the answer matters more; follow-ups may need a mention
                logger.warning("could not record thread %s in Redis: %s", key.describe(), exc)
        await self._deliver(question)

    async def _answered_in(self, key: ConversationKey) -> bool:
        """Whether the bot answered in this thread. Unknown while Redis is down: stay out of it
        then, rather than post into a thread that may be a human conversation."""
        try:
            return await self._threads.contains(key)
        except RedisError as exc:
            logger.warning(
                "not answering a follow-up in %s: Redis is unreachable (%s)", key.describe(), exc
            )
            return False

    async def _claim(self, question: Question) -> bool:
        """True when this replica should answer. Redis down (after the client's retries): answer
        anyway, as the Discord bot does. Bolt has already acknowledged the event, so Slack will
        not send it again, and refusing would lose the question; the worst case is a second
        answer if another copy arrives during the outage. The service then answers, or says that
        the conversation store is unreachable, with an error id."""
        try:
            return await self._claims.claim(PLATFORM, *question.claim_ids)
        except RedisError as exc:
            logger.warning(
                "could not claim slack event %s in Redis (%s); answering without the claim",
                question.claim_ids[0],
                exc,
            )
            return True

    async def _deliver(self, question: Question) -> None:
        key = question.key
        assert key.thread is not None
        user = User(question.user, can_configure=self.can_configure(question.user))
        place = Place(key.channel, key.thread, key.workspace, question.user)
        writer = ReplyWriter(
            self.client,
            place,
            self._features,
            limit=self.tuning.message_limit,
            interval_s=self.tuning.update_interval_s,
        )
        try:
            await writer.deliver(self.service.ask(key, user, question.text))
        except DELIVERY_ERRORS as exc:
            logger.error(
                "[error_id=%s] could not answer in %s: slack said %s",
                new_error_id(),
                key.describe(),
                slack_error(exc),
            )
        except Exception as exc:
            await self._tell(key, self._failure("ran into a problem", key, exc))

    @staticmethod
    def _failure(what: str, key: ConversationKey, exc: BaseException) -> str:
        error_id = new_error_id()
        if isinstance(exc, RedisError):  # an outage, not a bug: no traceback
            logger.error("[error_id=%s] redis error in %s: %s", error_id, key.describe(), exc)
        else:
            logger.exception("[error_id=%s] slack answer in %s failed", error_id, key.describe())
        return (
            f"Sorry, I {what}, so I couldn't answer. Please try again in a minute. "
            f"(error id: {error_id})"
        )

    async def _tell(self, key: ConversationKey, text: str) -> None:
        try:
            await self.client.chat_postMessage(channel=key.channel, thread_ts=key.thread, text=text)
        except DELIVERY_ERRORS as exc:
            logger.error("could not tell %s about a failure: %s", key.describe(), slack_error(exc))

    # --- lifecycle ----------------------------------------------------------------------------

    async def idle(self) -> None:
        """Wait until no answer is in flight."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Give answers in flight time to finish, then cancel the rest."""
        timeout = self.tuning.drain_timeout_s if timeout_s is None else timeout_s
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
