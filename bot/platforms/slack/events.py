"""Slack events and the /llm-settings command → the front door, each event answered once.

Bolt acknowledges every event before a listener runs (AsyncApp with process_before_response
False), so Slack's 3-second rule holds however long an answer takes. Listeners only decide
whether an event is a question and start its answer task at once, with nothing awaited before:
tasks start in arrival order, and the exactly-once claim (and, for a follow-up, the check that the
bot answered in that thread) runs under the conversation's lock, so the round trips of one mention
cannot let a later one overtake it.

Which messages are questions:
- `app_mention` in a channel: the mention's thread (its root, or the mention itself);
- a direct message (`message.im`), no mention needed;
- a follow-up without a mention: a reply in a thread where the bot last answered that same
  user (recorded in the store when the bot answers), unless the thread is handed off to a human.
  Other people's chatter in the thread stays theirs.
Never: messages from bots (this one included), edits, deletes and other subtypes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.web.async_client import AsyncWebClient

from bot.conversation import ConversationKey, StoreError
from bot.platforms.frontdoor import FrontDoor, error_reply, first_delivery
from bot.platforms.slack.feedback import Feedback
from bot.platforms.slack.mrkdwn import escape
from bot.platforms.slack.sink import SLACK_TEXT_LIMIT, UPDATE_INTERVAL_S, Features, Place, SlackSink
from bot.sampling import COMMAND
from bot.service import SupportService, User

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
    rate_limit_retries: int = 5
    rate_limit_jitter_s: float = 1.0
    drain_timeout_s: float = 20.0  # the app passes SHUTDOWN_GRACE_SECONDS
    socket_retry_s: float = 10.0  # Socket Mode: between connection attempts, and the ping period


@dataclass(frozen=True, slots=True)
class Question:
    key: ConversationKey  # thread = the thread the answer goes to
    user: str
    text: str
    claim_ids: tuple[str, ...]
    kind: str  # event type, for logs
    retry: str | None  # X-Slack-Retry-Num, only when this is a re-delivery (1, 2, …)


class SlackBot:
    def __init__(
        self,
        service: SupportService,
        client: AsyncWebClient,
        identity: Identity,
        *,
        admins: frozenset[str] = frozenset(),
        tuning: Tuning | None = None,
        handoff_to: tuple[str, ...] = (),
    ) -> None:
        self.handoff_to = handoff_to
        self.service = service
        self.client = client
        self.identity = identity
        self.tuning = tuning or Tuning()
        self.door = FrontDoor(service, PLATFORM, drain_timeout_s=self.tuning.drain_timeout_s)
        self._admins = admins
        self._features = Features()
        self._mention = re.compile(rf"<@{re.escape(identity.user_id)}(?:\|[^>]*)?>")
        self.received = 0  # events seen by the listeners, answered or not (tests wait on it)

    def register(self, app: AsyncApp) -> None:
        app.event("app_mention")(self._on_app_mention)
        app.event("message")(self._on_message)
        app.command(COMMAND)(self._on_settings)
        Feedback(self.service, PLATFORM, self.handoff_to).register(app)

    # --- listeners (run after bolt has acknowledged; nothing awaited before an answer starts) --

    async def _on_app_mention(self, body: dict[str, Any], request: AsyncBoltRequest) -> None:
        self.received += 1
        event = body.get("event") or {}
        if self._ignored(event) or "edited" in event:
            return
        self._start(self._question(body, request), follow_up=False)

    async def _on_message(self, body: dict[str, Any], request: AsyncBoltRequest) -> None:
        self.received += 1
        event = body.get("event") or {}
        if self._ignored(event):
            return
        if event.get("channel_type") == "im":
            self._start(self._question(body, request), follow_up=False)
            return
        if self._mention.search(str(event.get("text") or "")):
            return  # the app_mention event for this message answers it
        thread = event.get("thread_ts")
        if thread and thread != event.get("ts"):
            self._start(self._question(body, request), follow_up=True)

    async def _on_settings(
        self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond
    ) -> None:
        await ack()  # within Slack's 3 s; the reply follows through response_url
        user_id = str(body.get("user_id") or "")
        key = ConversationKey(PLATFORM, str(body.get("team_id") or ""), str(body["channel_id"]))
        user = User(user_id, body.get("user_name"), can_configure=self.can_configure(user_id))
        try:
            reply = escape(await self.service.settings(key, user, str(body.get("text") or "")))
        except Exception as exc:
            reply = error_reply(
                "Sorry, the settings command failed. Please try again.",
                "/llm-settings failed in %s",
                key.describe(),
                exc=exc,
            )
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
        if first_delivery(retry):
            retry = None  # Socket Mode's retry_attempt 0 becomes the header "0": a first delivery
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

    def _start(self, question: Question, *, follow_up: bool) -> None:
        self.door.start(self._answer(question, follow_up=follow_up), question.key.describe())

    async def _answer(self, question: Question, *, follow_up: bool) -> None:
        key = question.key
        assert key.thread is not None
        user = User(question.user, can_configure=self.can_configure(question.user))
        sink = SlackSink(
            self.client,
            Place(key.channel, key.thread, key.workspace, question.user),
            self._features,
            limit=self.tuning.message_limit,
        )

        async def admit() -> bool:  # under the conversation's lock
            if follow_up and not await self._follow_up(key, question.user):
                return False
            return await self.door.claim(question.claim_ids, question.kind, question.retry)

        await self.door.answer(
            key, user, question.text, sink, admit=admit, interval_s=self.tuning.update_interval_s
        )

    async def _follow_up(self, key: ConversationKey, user: str) -> bool:
        """Whether the bot last answered `user` in this thread (and no human has it). Unknown
        while the store is down: stay out then, rather than post into a human conversation."""
        try:
            return await self.service.store.may_follow_up(key, user)
        except StoreError as exc:
            logger.warning("not answering a follow-up in %s: the store is unreachable (%s)",
                           key.describe(), exc)  # fmt: skip
            return False

    # --- lifecycle ----------------------------------------------------------------------------

    async def idle(self) -> None:
        """Wait until no answer is in flight."""
        await self.door.idle()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Give answers in flight time to finish, then cancel the rest."""
        await self.door.drain(timeout_s)
