"""Showing a streamed answer in Discord: a reply that is edited as text arrives.

Discord allows about five message writes per five seconds in a channel, so writes are paced per
channel (`ChannelPacer`), not per message. Text that outgrows one message continues in follow-up
messages, split with the shared splitter so no message ends inside a code block.

Reading the model's stream never waits for Discord: at most one write is in flight, text that
arrives meanwhile is shown by the next write, and a timer shows the last of it when the stream
pauses. Intermediate writes that fail are skipped; the final text is retried through rate limits,
server errors and network errors.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import discord

from bot.platforms.text import split_message

logger = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters in one Discord message
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


class StreamedReply:
    """An answer shown as a reply to `source`, growing as text arrives.

    `append()` never waits; `finish()` shows the final text and says whether it was delivered.
    """

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
        self._parts: list[str] = []
        self._writing: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None
        self._failures = 0
        self._closed = False  # finishing or cancelled: no more intermediate writes
        self._gave_up = False  # Discord refused for good (message deleted, no permission)
        self.messages: list[discord.Message] = []
        self._shown: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def append(self, text: str) -> None:
        self._parts.append(text)
        self._update()

    async def finish(self, notice: str = "") -> bool:
        """Show the whole text (with `notice`, e.g. an error, after it); True once delivered."""
        self._closed = True
        self._cancel_timer()
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        if notice:
            self._parts.append(("\n\n" if self.text.strip() else "") + notice)
        if self._gave_up:
            return False
        for attempt in range(1, self._final_attempts + 1):
            await self._pacer.turn(self._channel_id)
            try:
                await self._render(displayable(self.text, final=True))
                return True
            except Exception as exc:
                delay = retry_delay(exc, attempt, self._retry_base)
                if delay is None or attempt == self._final_attempts:
                    self._log_giving_up(exc, attempt)
                    return False
                self._log_retry(exc, delay)
                self._pacer.back_off(self._channel_id, delay)
        return False  # pragma: no cover - the loop always returns

    def cancel(self) -> None:
        self._closed = True
        self._cancel_timer()
        if self._writing is not None:
            self._writing.cancel()

    def _update(self) -> None:
        """Start a write of the newest text if none is running and the channel has a slot;
        otherwise make sure one happens when the slot comes."""
        if self._closed or self._gave_up:
            return
        if self._writing is not None and not self._writing.done():
            return
        wait = self._pacer.wait_s(self._channel_id)
        if wait > 0:
            if self._later is None:
                loop = asyncio.get_running_loop()
                self._later = loop.call_later(wait, self._on_timer)
            return
        self._pacer.take(self._channel_id)
        self._writing = asyncio.create_task(self._write(displayable(self.text, final=False)))

    def _on_timer(self) -> None:
        self._later = None
        self._update()

    def _cancel_timer(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None

    async def _write(self, text: str) -> None:
        try:
            await self._render(text)
        except Exception as exc:
            self._failures += 1
            delay = retry_delay(exc, self._failures, self._retry_base)
            if delay is None:
                self._log_giving_up(exc, self._failures)
                self._gave_up = True
                return
            self._log_retry(exc, delay)
            self._pacer.back_off(self._channel_id, delay)
        else:
            self._failures = 0
        if self._displayed_text_is_behind():
            self._update()  # text arrived while this write was in flight

    def _displayed_text_is_behind(self) -> bool:
        pages = split_message(displayable(self.text, final=False), self._limit)
        return pages != self._shown

    async def _render(self, text: str) -> None:
        """Make the messages show `text`, touching only the ones whose page changed."""
        pages = split_message(text, self._limit)
        for index, page in enumerate(pages):
            if index == len(self.messages):
                self.messages.append(await self._post(page, first=index == 0))
                self._shown.append(page)
            elif self._shown[index] != page:
                self.messages[index] = await self.messages[index].edit(content=page)
                self._shown[index] = page
        # A re-split can need fewer messages than before (rare: a block moved back).
        while len(self.messages) > max(len(pages), 1):
            await self.messages[-1].delete()
            self.messages.pop()
            self._shown.pop()

    async def _post(self, page: str, *, first: bool) -> discord.Message:
        channel = self._source.channel
        if first:
            # Still answer if the question was deleted meanwhile, just without the reply link.
            reference = self._source.to_reference(fail_if_not_exists=False)
            return await channel.send(page, reference=reference)
        return await channel.send(page)

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, discord.HTTPException):
        return f"HTTP {exc.status} (code {exc.code})"
    return type(exc).__name__
