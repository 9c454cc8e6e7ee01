"""The Discord sink of the front door's progressive message: a reply edited as text arrives.

Discord allows about five message writes per five seconds in a channel, so writes are paced per
channel (`ChannelPacer`, which the front door consults through `wait_s()`), not per message. Text
that outgrows one message continues in follow-up messages, split with the shared splitter so no
message ends inside a code block. "typing…" shows while the answer is coming.

A live write that fails is retried after a back-off (rate limits, server and network errors) or
given up for good (the message was deleted, no permission); the final text is retried through
rate limits, server errors and network errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable

import aiohttp
import discord

from bot.platforms.discord.feedback import controls
from bot.platforms.text import split_message

logger = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters in one Discord message
TYPING_EVERY_S = 8.0  # Discord shows "typing…" for about 10 s per request
_FENCE_LINE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)


class ChannelPacer:
    """Spaces each channel's message writes at least `interval` seconds apart."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[int, float] = {}  # channel id -> earliest time of its next write

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def wait_s(self, channel_id: int) -> float:
        """Seconds until the channel's next write slot (0 when it is free now)."""
        return max(0.0, self._next.get(channel_id, 0.0) - self._now())

    def take(self, channel_id: int) -> None:
        """Use the slot that is free now."""
        now = self._now()
        self._next[channel_id] = now + self.interval
        if len(self._next) > 1024:  # forget channels that have been quiet
            self._next = {c: t for c, t in self._next.items() if t > now}

    async def turn(self, channel_id: int) -> None:
        """Wait for the channel's next write slot and take it."""
        wait = self.wait_s(channel_id)
        while wait > 0:
            await asyncio.sleep(wait)
            wait = self.wait_s(channel_id)  # a back-off may have moved the slot meanwhile
        self.take(channel_id)

    def back_off(self, channel_id: int, delay: float) -> None:
        """Push the channel's next write at least `delay` seconds into the future."""
        at = self._now() + delay
        self._next[channel_id] = max(self._next.get(channel_id, at), at)


def retry_delay(exc: BaseException, attempt: int, base: float, cap: float = 30.0) -> float | None:
    """Seconds to wait before retrying a write that raised `exc`; None if a retry cannot help.

    discord.py already waits out 429s inside its HTTP client; what reaches us is a 429 it gave up
    on, a 5xx, or a network error, all worth another try after an exponential backoff.
    """
    backoff = min(cap, base * 2.0 ** (attempt - 1))
    if isinstance(exc, discord.RateLimited):
        return max(float(exc.retry_after), backoff)
    if isinstance(exc, discord.HTTPException):
        status = int(exc.status)
        return backoff if status == 429 or status >= 500 else None
    if isinstance(exc, OSError | aiohttp.ClientError):  # TimeoutError is an OSError
        return backoff
    return None


def displayable(text: str, *, final: bool) -> str:
    """The text as shown now: trimmed, with a still-open code fence closed while streaming."""
    text = text.strip()
    if not final and len(_FENCE_LINE.findall(text)) % 2:
        text += "\n```"
    return text


class DiscordSink:
    """Implements bot.platforms.frontdoor.Sink: an answer shown as a reply to `source`."""

    def __init__(
        self,
        source: discord.Message,
        pacer: ChannelPacer,
        *,
        retry_base: float = 1.0,
        final_attempts: int = 8,
        limit: int = MESSAGE_LIMIT,
    ) -> None:
        self._source = source
        self._channel_id = source.channel.id
        self._pacer = pacer
        self._retry_base = retry_base
        self._final_attempts = final_attempts
        self._limit = limit
        self._typing: asyncio.Task[None] | None = None
        self._failures = 0
        self._gave_up = False  # Discord refused for good (message deleted, no permission)
        self.messages: list[discord.Message] = []
        self._shown: list[str] = []

    async def working(self) -> None:
        await self._type()  # before any text: writes wait for this
        self._typing = asyncio.create_task(self._keep_typing())

    def wait_s(self) -> float:
        return self._pacer.wait_s(self._channel_id)

    async def show(self, text: str) -> bool:
        if self._gave_up:
            return True
        self._pacer.take(self._channel_id)
        try:
            await self._render(displayable(text, final=False))
        except Exception as exc:
            self._failures += 1
            delay = retry_delay(exc, self._failures, self._retry_base)
            if delay is None:
                self._log_giving_up(exc, self._failures)
                self._gave_up = True
                return True
            self._log_retry(exc, delay)
            self._pacer.back_off(self._channel_id, delay)
            return False
        self._failures = 0
        return True

    async def finish(self, text: str, answer_id: str | None = None) -> None:
        await self._stop_typing()
        if not self._gave_up:
            for attempt in range(1, self._final_attempts + 1):
                await self._pacer.turn(self._channel_id)
                try:
                    await self._render(displayable(text, final=True), answer_id)
                    return
                except Exception as exc:
                    delay = retry_delay(exc, attempt, self._retry_base)
                    if delay is None or attempt == self._final_attempts:
                        self._log_giving_up(exc, attempt)
                        break
                    self._log_retry(exc, delay)
                    self._pacer.back_off(self._channel_id, delay)
        logger.error("the answer in channel %s could not be shown in Discord", self._channel_id)

    async def tell(self, text: str) -> None:
        try:
            await self._post(text, first=True)
        except (discord.HTTPException, OSError, aiohttp.ClientError) as exc:
            logger.error("could not tell channel %s about a failure: %s",
                         self._channel_id, _describe(exc))  # fmt: skip

    def cancel(self) -> None:
        if self._typing is not None:
            self._typing.cancel()

    async def _type(self) -> None:
        try:
            await self._source.channel.typing()
        except (discord.HTTPException, OSError, aiohttp.ClientError) as exc:
            logger.debug("typing indicator failed: %s", exc)  # never stops an answer

    async def _keep_typing(self) -> None:
        while True:
            await asyncio.sleep(TYPING_EVERY_S)
            await self._type()

    async def _stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._typing

    async def _render(self, text: str, answer_id: str | None = None) -> None:
        """Make the messages show `text`, touching only the ones whose page changed; with
        `answer_id`, the last page gets the vote buttons."""
        pages = split_message(text, self._limit)
        for index, page in enumerate(pages):
            view = controls(answer_id) if answer_id and index == len(pages) - 1 else None
            if index == len(self.messages):
                self.messages.append(await self._post(page, first=index == 0, view=view))
                self._shown.append(page)
            elif self._shown[index] != page or view is not None:
                edited = self.messages[index].edit(content=page, view=view)
                self.messages[index] = await edited if view is None else await _once(edited, view)
                self._shown[index] = page
        # A re-split can need fewer messages than before (rare: a block moved back).
        while len(self.messages) > max(len(pages), 1):
            await self.messages[-1].delete()
            self.messages.pop()
            self._shown.pop()

    async def _post(
        self, page: str, *, first: bool, view: discord.ui.View | None = None
    ) -> discord.Message:
        channel = self._source.channel
        # Still answer if the question was deleted meanwhile, just without the reply link.
        reference = self._source.to_reference(fail_if_not_exists=False) if first else None
        if view is None:
            return await channel.send(page, reference=reference)  # type: ignore[arg-type]
        return await _once(channel.send(page, reference=reference, view=view), view)  # type: ignore[arg-type]

    def _log_retry(self, exc: Exception, delay: float) -> None:
        logger.warning(
            "writing an answer in channel %s failed (%s); next try in %.2fs",
            self._channel_id,
            _describe(exc),
            delay,
        )

    def _log_giving_up(self, exc: Exception, attempts: int) -> None:
        logger.error(
            "giving up on showing an answer in channel %s after %d attempt(s): %s",
            self._channel_id,
            attempts,
            _describe(exc),
            # A bug rather than Discord refusing: keep the traceback.
            exc_info=None if isinstance(exc, discord.DiscordException) else exc,
        )


async def _once(write: Awaitable[discord.Message], view: discord.ui.View) -> discord.Message:
    """Send a message with the vote buttons, then forget the view (presses are handled by
    custom id in the client's on_interaction, so no View needs to stay in memory)."""
    try:
        return await write
    finally:
        view.stop()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, discord.HTTPException):
        return f"HTTP {exc.status} (code {exc.code})"
    return type(exc).__name__
