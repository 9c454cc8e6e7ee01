"""The Slack sink of the front door's progressive message: one answer in a Slack thread.

Two ways to show text as it is generated, chosen per workspace:

- **stream**: slack_sdk's `chat_stream` (chat.startStream / appendStream / stopStream), which
  Slack renders as a live message from markdown. The thread's "is thinking…" status
  (assistant.threads.setStatus) shows work before the first text.
- **update**: a placeholder `…` posted at once, then `chat.update` with the text so far (as
  mrkdwn). Used where streaming or the status is refused (older plans, Enterprise policies,
  missing scopes); the refusal is remembered for the workspace for a while.

The front door calls `show()` at most once per interval while text arrives (Slack allows about
one update per second per message) and `finish()` with the final text, which is always sent,
after waiting out any 429 (the Web API client honours Retry-After). An answer longer than `limit`
is split with the shared splitter into follow-up messages in the same thread; a split point that
moves as the text grows is corrected by rewriting the affected message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_chat_stream import AsyncChatStream
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.platforms.slack.feedback import controls, text_blocks
from bot.platforms.slack.mrkdwn import defuse, to_mrkdwn
from bot.platforms.text import split_message
from bot.service import new_error_id

logger = logging.getLogger(__name__)

# Slack truncates a message's text at 40,000 characters but asks for at most 4,000 for reliable
# rendering; 3,900 leaves room for the live cursor and for mrkdwn escaping (`&` → `&amp;`).
SLACK_TEXT_LIMIT = 3_900
UPDATE_INTERVAL_S = 1.0
WORKING_STATUS = "is thinking…"
PLACEHOLDER = "…"
CURSOR = " …"  # after the text while more is coming (update mode)
# How long a workspace's refusal of streaming or the status is trusted before trying again.
FEATURE_RETRY_S = 600.0

# What a failed Web API call can raise: Slack's own errors, and the transport's.
DELIVERY_ERRORS = (SlackClientError, aiohttp.ClientError, TimeoutError)


class Features:
    """Which optional Slack features each workspace allows, learnt from refusals."""

    def __init__(
        self,
        retry_after_s: float = FEATURE_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._refused: dict[tuple[str, str], float] = {}

    def allows(self, feature: str, team: str) -> bool:
        until = self._refused.get((feature, team))
        return until is None or self._clock() >= until

    def refuse(self, feature: str, team: str, reason: str) -> None:
        if self.allows(feature, team):
            logger.info(
                "slack workspace %s refused %s (%s); using the fallback for %.0fs",
                team,
                feature,
                reason,
                self._retry_after_s,
            )
        self._refused[(feature, team)] = self._clock() + self._retry_after_s


@dataclass(frozen=True, slots=True)
class Place:
    """Where the answer goes, and who asked (chat.startStream wants the recipient)."""

    channel: str
    thread_ts: str
    team: str
    user: str


@dataclass
class _Message:
    """One Slack message of the answer."""

    ts: str | None = None
    shown: str = ""  # the content last sent: markdown (streamed) or mrkdwn (posted)
    stream: AsyncChatStream | None = None  # open while streaming
    markdown: bool = False  # made by a stream: rewrites must use markdown_text


def _ts(response: AsyncSlackResponse | None) -> str | None:
    """The message ts a Web API answer names (a stream's, from start/append/stop)."""
    ts = response.get("ts") if response is not None else None
    return str(ts) if ts else None


def slack_error(exc: BaseException) -> str:
    """A short, secret-free reason for logs."""
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error") or f"HTTP {exc.response.status_code}")
    return type(exc).__name__


class SlackSink:
    """Implements bot.platforms.frontdoor.Sink for one thread."""

    def __init__(
        self,
        client: AsyncWebClient,
        place: Place,
        features: Features,
        *,
        limit: int = SLACK_TEXT_LIMIT,
    ) -> None:
        self._client = client
        self._place = place
        self._features = features
        self._limit = limit
        self._messages: list[_Message] = []
        self._streaming = False
        self._placeholder: str | None = None
        self._controls: dict[str, object] | None = None  # the final message's 👍/👎 block
        self._last = -1  # index of the final message (the one the controls go on)

    def wait_s(self) -> float:
        return 0.0  # Slack's limit is per message: the front door's interval keeps to it

    async def show(self, text: str) -> bool:
        await self._show(text, final=False)
        return True  # a failed live update is not retried: the next one catches up

    async def finish(self, text: str, answer_id: str | None = None) -> None:
        self._controls = controls(answer_id) if answer_id else None
        await self._show(text, final=True)

    async def tell(self, text: str) -> None:
        try:
            await self._client.chat_postMessage(
                channel=self._place.channel, thread_ts=self._place.thread_ts, text=text
            )
        except DELIVERY_ERRORS as exc:
            logger.error("could not tell %s about a failure: %s", self._where(), slack_error(exc))

    def cancel(self) -> None:
        pass  # an open stream expires on Slack's side

    # --- the working indicator ------------------------------------------------------------------

    async def working(self) -> None:
        team = self._place.team
        if self._features.allows("stream", team) and self._features.allows("status", team):
            try:
                await self._client.assistant_threads_setStatus(
                    channel_id=self._place.channel,
                    thread_ts=self._place.thread_ts,
                    status=WORKING_STATUS,
                )
                self._streaming = True
            except SlackApiError as exc:
                self._features.refuse("status", team, slack_error(exc))
        if not self._streaming:
            try:
                response = await self._client.chat_postMessage(
                    channel=self._place.channel, thread_ts=self._place.thread_ts, text=PLACEHOLDER
                )
            except DELIVERY_ERRORS as exc:  # the answer itself may still get through
                logger.warning(
                    "slack placeholder in %s failed: %s", self._where(), slack_error(exc)
                )
                return
            self._placeholder = str(response["ts"])

    # --- showing text ---------------------------------------------------------------------------

    async def _show(self, text: str, *, final: bool) -> None:
        parts = split_message(text, self._limit)
        self._last = len(parts) - 1 if final else -1
        for index, part in enumerate(parts):
            done = final or index < len(parts) - 1
            try:
                await self._show_part(index, part, done)
            except DELIVERY_ERRORS as exc:
                if not final:
                    # Live updates are best effort: the next one (or the final text) catches up.
                    logger.warning(
                        "slack live update in %s failed: %s", self._where(), slack_error(exc)
                    )
                    return
                await self._post_again(index, part, exc)
        if final:
            await self._drop_extra(len(parts))

    async def _show_part(self, index: int, part: str, done: bool) -> None:
        if index == len(self._messages):
            self._messages.append(self._new_message(index))
        message = self._messages[index]
        if self._streaming and (message.stream is not None or message.ts is None):
            try:
                await self._stream(message, part, done)
                return
            except SlackApiError as exc:
                self._stop_streaming(message, exc)
        await self._put(message, part, done)

    def _new_message(self, index: int) -> _Message:
        if index == 0 and self._placeholder is not None:
            return _Message(ts=self._placeholder, shown=PLACEHOLDER)
        return _Message(markdown=self._streaming)

    async def _stream(self, message: _Message, part: str, done: bool) -> None:
        part = defuse(part)
        if message.stream is None:
            message.stream = await self._client.chat_stream(
                channel=self._place.channel,
                thread_ts=self._place.thread_ts,
                recipient_team_id=self._place.team,
                recipient_user_id=self._place.user,
                buffer_size=1,  # we throttle ourselves; every append is sent
            )
        stream = message.stream
        if not part.startswith(message.shown):
            # A split point moved back into text already streamed: close it and rewrite it.
            message.ts = _ts(await stream.stop()) or message.ts
            message.stream = None
            await self._put(message, part, done)
            return
        delta = part[len(message.shown) :]
        response = None
        if done:
            blocks = self._blocks_for(message, None)
            response = await stream.stop(markdown_text=delta or None, blocks=blocks)
            message.stream = None
        elif delta:
            response = await stream.append(markdown_text=delta)
        message.ts = _ts(response) or message.ts
        message.shown = part

    def _stop_streaming(self, message: _Message, exc: SlackApiError) -> None:
        reason = slack_error(exc)
        if message.ts is None:
            self._features.refuse("stream", self._place.team, reason)  # chat.startStream refused
        else:
            logger.warning(
                "slack stream in %s failed (%s); updating instead", self._where(), reason
            )
        message.stream = None
        message.markdown = message.ts is not None
        self._streaming = False

    async def _put(self, message: _Message, part: str, done: bool) -> None:
        """Post or rewrite a whole message (update mode, and corrections)."""
        view = defuse(part) if message.markdown else to_mrkdwn(part)
        view += "" if done else CURSOR
        blocks = self._blocks_for(message, view) if done else None
        if view == message.shown and blocks is None:
            return
        place = self._place
        if message.ts is None:
            response = await self._client.chat_postMessage(
                channel=place.channel,
                thread_ts=place.thread_ts,
                text=view,
                blocks=blocks,
                unfurl_links=False,
                unfurl_media=False,
            )
            message.ts = str(response["ts"])
        elif blocks is not None:  # the text as blocks, with the controls under it
            await self._client.chat_update(
                channel=place.channel, ts=message.ts, text=view, blocks=blocks
            )
        elif message.markdown:
            await self._client.chat_update(channel=place.channel, ts=message.ts, markdown_text=view)
        else:
            await self._client.chat_update(channel=place.channel, ts=message.ts, text=view)
        message.shown = view

    def _blocks_for(self, message: _Message, view: str | None) -> list[dict[str, object]] | None:
        """The blocks of the final message when it carries the controls, else None. `view`: the
        whole text (a posted message); None for a stream, whose blocks follow its text."""
        if self._controls is None or self._last < 0 or message is not self._at(self._last):
            return None
        if view is None:
            return [self._controls]
        return [*text_blocks(view, markdown=message.markdown), self._controls]

    def _at(self, index: int) -> _Message | None:
        return self._messages[index] if index < len(self._messages) else None

    async def _post_again(self, index: int, part: str, cause: BaseException) -> None:
        """The final text could not be put in its message: post it as a new one."""
        logger.warning(
            "slack final update in %s failed (%s); posting the text anew",
            self._where(),
            slack_error(cause),
        )
        fresh, old = _Message(), self._messages[index]
        self._messages[index] = fresh  # in its place first: the controls go on the final one
        try:
            await self._put(fresh, part, done=True)
        except DELIVERY_ERRORS as exc:
            self._messages[index] = old
            logger.error(
                "[error_id=%s] could not deliver an answer in %s: %s",
                new_error_id(),
                self._where(),
                slack_error(exc),
            )
            return

    async def _drop_extra(self, keep: int) -> None:
        """Delete messages a moved split point left over (rare)."""
        for message in self._messages[keep:]:
            try:
                if message.stream is not None:
                    message.ts = _ts(await message.stream.stop()) or message.ts
                if message.ts is not None:
                    await self._client.chat_delete(channel=self._place.channel, ts=message.ts)
            except DELIVERY_ERRORS as exc:
                logger.warning("slack cleanup in %s failed: %s", self._where(), slack_error(exc))
        del self._messages[keep:]

    def _where(self) -> str:
        return f"slack:{self._place.team}:{self._place.channel}:{self._place.thread_ts}"
