"""What every platform shares between its events and the SupportService.

- **Tasks and drain.** Each answer runs as a task of ours, registered the moment it is created
  (before its first await), so a shutdown waits for every answer in progress, including one
  still claiming its event, before the runtime (Redis, the models) is closed under it.
- **Order.** An answer task's first await is the first step of `SupportService.ask()`, which takes
  the conversation's FIFO lock before anything else; exactly-once claims and other pre-checks run
  inside it (`admit`). Tasks created in arrival order are therefore answered in arrival order.
- **Claim or answer.** A store outage during a claim answers anyway, with a warning: answering
  twice is better than not at all, and the service then explains the outage with an error id.
- **Errors users can act on.** `error_reply()` logs and words a failure with one error id: the
  answer's correlation id, which every log line of that answer carries too.
- **One progressive message.** `ProgressiveMessage` collects the answer's events, shows the text
  at most once per interval through a platform `Sink`, and always sends the final text.
- **Shutdown.** Answers get one grace period (SHUTDOWN_GRACE_SECONDS) to finish; an answer still
  running after it is cut: its message is closed with the text so far and a notice (a Slack
  stream stopped, a Discord message edited a last time), within `CUT_WRITE_S`, and logged.
- **Start-up races the stop signal** (`unless_stopped`): SIGTERM while connecting or loading
  stops at once instead of after the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from bot.conversation import ConversationKey, StoreError
from bot.knowledge.cite import Sources
from bot.llm.base import Delta
from bot.ops import metrics
from bot.service import Answered, AnswerEvent, Failure, SupportService, User, new_error_id

logger = logging.getLogger(__name__)

NO_ANSWER = "Sorry, I have no answer to that. Please try rephrasing your question."
SOMETHING_WENT_WRONG = "Sorry, something went wrong while answering. Please try again."
CUT_NOTICE = (
    "⚠️ I was restarted before I could finish this answer, so it stops here. "
    "Please ask again in a minute."
)
CUT_WRITE_S = 5.0  # how long closing a cut answer's message may take during shutdown
LEASE_WRITE_S = 2.0  # how long marking an event done (or letting it go) may take
Admit = Callable[[], Awaitable[bool]]
T = TypeVar("T")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT while the block runs (the handlers are removed after)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # loops without signal handlers
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when `stop` is set first: `work` is then cancelled, and awaited
    so that what it opened is closed (a start-up step must clean up when cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


def first_delivery(retry: str | None) -> bool:
    """Slack numbers deliveries from 0 (Socket Mode sends `retry_attempt: 0`): 0 is the first."""
    return retry is None or retry.strip() in ("", "0")


def error_reply(message: str, log: str, *args: object, exc: BaseException | None = None) -> str:
    """Log a failure the user will be told about, and return `message` with the same error id.

    Inside an answer the id is the answer's correlation id. An outage (the store) is one line;
    anything else is a bug and keeps its traceback."""
    error_id = new_error_id()
    trace = exc if exc is not None and not isinstance(exc, StoreError) else None
    suffix = f": {exc}" if exc is not None and trace is None else ""
    logger.error("[error_id=%s] " + log + "%s", error_id, *args, suffix, exc_info=trace)
    return f"{message} (error id: {error_id})"


class FrontDoor:
    """One platform's answers in flight, and the way each one is admitted and delivered."""

    def __init__(self, service: SupportService, platform: str, *, drain_timeout_s: float) -> None:
        self.service = service
        self.platform = platform
        self.drain_timeout_s = drain_timeout_s
        self.accepting = True
        self.cutting = False  # past the grace period: answers still running are being cut
        self._tasks: set[asyncio.Task[None]] = set()
        # By answer task: the lease it won, and the conversation it answers in.
        self._leases: dict[asyncio.Task[Any] | None, _Lease] = {}
        self._asking: dict[asyncio.Task[Any] | None, ConversationKey] = {}

    @property
    def tasks(self) -> frozenset[asyncio.Task[None]]:
        return frozenset(self._tasks)

    def start(self, work: Coroutine[Any, Any, None], what: str) -> bool:
        """Run `work` as an answer task, registered at once; False once draining."""
        if not self.accepting:
            work.close()
            logger.warning("not answering %s: shutting down", what)
            return False
        task = asyncio.create_task(work, name=f"answer {what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def idle(self) -> None:
        """Wait until no answer is in flight."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Take no more questions; give answers in flight `timeout_s` to finish, cancel the rest
        and wait for them to end, so nothing runs on once the runtime is closed."""
        self.accepting = False
        timeout = self.drain_timeout_s if timeout_s is None else timeout_s
        pending = {task for task in self._tasks if task is not asyncio.current_task()}
        if not pending:
            return
        logger.info("waiting for %d answer(s) in progress", len(pending))
        _, late = await asyncio.wait(pending, timeout=timeout)
        if late:
            logger.warning("cutting %d answer(s) still running after the %.0fs grace period",
                           len(late), timeout)  # fmt: skip
            self.cutting = True
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def claim(self, ids: tuple[str, ...], what: str, retry: str | None = None) -> bool:
        """True when this process should answer: the first to claim every id, or the store is
        down (then answer anyway; the event was acknowledged and would otherwise be lost)."""
        try:
            # The conversation this task answers in (set by answer()): its turn is leased too.
            conversation = self._asking.get(asyncio.current_task())
            token = await self.service.store.claim(self.platform, *ids, conversation=conversation)
        except StoreError as exc:
            logger.warning(
                "could not claim %s %s %s (%s); answering without the claim",
                self.platform,
                what,
                ids[0],
                exc,
            )
            return True
        first = token is not None
        if token is not None:
            self._hold(ids, token, conversation)
        if not first:
            metrics.DUPLICATES.labels(self.platform).inc()
            logger.info("ignoring a duplicate %s %s %s (retry %s)",
                        self.platform, what, ids[0],
                        "none" if first_delivery(retry) else retry)  # fmt: skip
        elif not first_delivery(retry):
            logger.info("answering %s re-delivery %s (retry %s) that no replica had taken",
                        self.platform, ids[0], retry)  # fmt: skip
        return first

    async def answer(
        self,
        key: ConversationKey,
        user: User,
        text: str,
        sink: Sink,
        *,
        admit: Admit | None = None,
        interval_s: float,
    ) -> None:
        """Ask the service and show the answer through `sink`. Awaits nothing before the service's
        lock: call it first thing in a task that `start()` created."""
        message = ProgressiveMessage(
            sink, interval_s=interval_s, where=key.describe(), cutting=lambda: self.cutting
        )

        async def admitted() -> bool:
            if admit is not None and not await admit():
                return False
            message.begin()  # the working indicator, while the model starts
            return True

        task = asyncio.current_task()
        self._asking[task] = key.scoped(self.service.scope)
        delivered = False
        try:
            await message.deliver(self.service.ask(key, user, text, admit=admitted))
            delivered = True
        finally:
            del self._asking[task]
            lease = self._leases.pop(task, None)
            if lease is not None:
                lease.renewer.cancel()
                await self._settle(lease, delivered)

    async def _settle(self, lease: _Lease, delivered: bool) -> None:
        """Delivered: the event is done (a done mark). Not delivered (cut at shutdown, a bug):
        the event and the conversation's turn are let go now rather than when the lease runs
        out, so the channel's next question, on any replica, need not wait. A replica that dies
        before this leaves only the lease, which expires; the next delivery is answered then."""
        store = self.service.store
        try:
            async with asyncio.timeout(LEASE_WRITE_S):
                if delivered:
                    await store.complete(self.platform, lease.ids, lease.token, lease.conversation)
                else:
                    await store.release(self.platform, lease.ids, lease.token, lease.conversation)
        except (StoreError, TimeoutError) as exc:
            logger.warning("could not %s %s event %s (%s); its lease will expire",
                           "mark done" if delivered else "let go of", self.platform,
                           lease.ids[0], exc or "timed out")  # fmt: skip

    def _hold(self, ids: tuple[str, ...], token: str, conversation: ConversationKey | None) -> None:
        """Keep the lease this answer task won, renewed until `answer()` ends."""
        task = asyncio.current_task()
        renewer = asyncio.create_task(self._renew(ids, token, conversation), name=f"lease {ids[0]}")
        self._leases[task] = _Lease(ids, token, conversation, renewer)

    async def _renew(
        self, ids: tuple[str, ...], token: str, conversation: ConversationKey | None
    ) -> None:
        store = self.service.store
        while True:
            await asyncio.sleep(store.lease_s / 3)
            try:
                if not await store.renew(self.platform, ids, token, conversation):
                    logger.warning("lost the lease on %s event %s: another replica may answer it",
                                   self.platform, ids[0])  # fmt: skip
                    return
            except StoreError as exc:  # the next renewal may get through before it expires
                logger.warning("could not renew the lease on %s event %s (%s)",
                               self.platform, ids[0], exc)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Lease:
    """An event this process is answering: its claim's ids and token, and the task renewing it."""

    ids: tuple[str, ...]
    token: str
    conversation: ConversationKey | None  # whose turn the lease also holds
    renewer: asyncio.Task[None]


class Sink(Protocol):
    """Where one answer is shown on a platform (bot.platforms.slack.sink, .discord.sink)."""

    async def working(self) -> None:
        """Show that an answer is coming; failures are the sink's to log."""
        ...

    def wait_s(self) -> float:
        """Seconds until the platform may be written again (0 when now)."""
        ...

    async def show(self, text: str) -> bool:
        """Show the text so far (best effort). False: not shown, and worth trying again."""
        ...

    async def finish(self, text: str, answer_id: str | None = None) -> None:
        """Show the final text, retrying what is worth retrying; log what cannot be delivered.
        With `answer_id` (a stored answer), the message carries the 👍/👎 controls for it.
        Raises only for a bug (the front door then tells the user with an error id)."""
        ...

    async def tell(self, text: str) -> None:
        """Post a short notice on its own (a failure); never raises for delivery failures."""
        ...

    def cancel(self) -> None:
        """The answer was cancelled: stop indicators, abandon writes."""
        ...


class ProgressiveMessage:
    """One answer, shown as it grows: at most one write in flight, at most one per `interval_s`
    (and when the sink allows), the newest text each time, and always the final text."""

    def __init__(
        self,
        sink: Sink,
        *,
        interval_s: float,
        where: str,
        cutting: Callable[[], bool] = lambda: False,
    ) -> None:
        self._sink = sink
        self._cutting = cutting
        self._interval_s = interval_s
        self._where = where
        self.text = ""
        self.notes: list[str] = []  # failures and notices, shown after the text
        self.answer_id: str | None = None  # the stored answer's id: its controls carry it
        self._working: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = -math.inf  # loop time of the last write's start
        self._shown = ""
        self._closed = False

    def begin(self) -> None:
        """The answer is coming: start the working indicator (once)."""
        if self._working is None:
            self._working = asyncio.create_task(self._show_working())

    async def _show_working(self) -> None:
        try:
            await self._sink.working()
        except Exception:  # a bug in a sink: the answer still comes without the indicator
            logger.exception("showing that an answer is coming in %s failed", self._where)

    async def deliver(self, events: AsyncIterator[AnswerEvent]) -> None:
        """Follow the answer's events (iterating them is this task's first await), then send the
        final text. A cancelled delivery stops indicators and sends nothing more."""
        try:
            await self._collect(events)
            self._close()
            if self._working is None and not self.text and not self.notes:
                return  # not admitted (a duplicate): nothing to say
            await asyncio.gather(*self._in_flight(), return_exceptions=True)
            try:
                await self._sink.finish(self.final_text(), self.answer_id)
            except Exception as exc:
                await self._sink.tell(
                    error_reply(
                        "Sorry, I ran into a problem, so I couldn't answer. "
                        "Please try again in a minute.",
                        "showing the answer in %s failed",
                        self._where,
                        exc=exc,
                    )
                )
        except asyncio.CancelledError:
            self._close()
            if self._cutting() and (self._working is not None or self.text):
                await self._cut()
            else:
                self._abandon()
            raise
        except BaseException:
            self._close()
            self._abandon()
            raise

    def _abandon(self) -> None:
        self._sink.cancel()
        for task in self._in_flight():
            task.cancel()

    async def _cut(self) -> None:
        """Shutdown cut this answer: close its message with the text so far and a notice (a
        Slack stream is stopped, not left open), in at most CUT_WRITE_S."""
        notice = error_reply(
            CUT_NOTICE, "answer in %s cut by shutdown after %d characters", self._where,
            len(self.text),
        )  # fmt: skip

        async def close() -> None:
            await asyncio.gather(*self._in_flight(), return_exceptions=True)
            await self._sink.finish("\n\n".join(p for p in (self.text.strip(), notice) if p))

        closing = asyncio.ensure_future(close())
        done, _ = await asyncio.wait({closing}, timeout=CUT_WRITE_S)
        if not done or closing.exception() is not None:
            closing.cancel()
            logger.error("could not close the cut answer in %s within %.0fs",
                         self._where, CUT_WRITE_S)  # fmt: skip
            self._abandon()

    def final_text(self) -> str:
        parts = [self.text.strip(), *self.notes]
        return "\n\n".join(part for part in parts if part) or NO_ANSWER

    async def _collect(self, events: AsyncIterator[AnswerEvent]) -> None:
        try:
            try:
                async for event in events:
                    if isinstance(event, Delta):
                        self.text += event.text
                        self._kick()
                    elif isinstance(event, Failure):
                        self.notes.append(event.message)
                    elif isinstance(event, Sources):
                        # Markdown links: Slack's sink renders them `<url|title>`, Discord masked.
                        self.notes.append(event.markdown())
                    elif isinstance(event, Answered):
                        self.answer_id = event.answer_id
            finally:
                closer = getattr(events, "aclose", None)  # ends the turn now, also if cancelled
                if closer is not None:
                    await closer()
        except Exception as exc:  # a bug below the service: the user still gets a message
            self.notes.append(
                error_reply(SOMETHING_WENT_WRONG, "answering in %s failed", self._where, exc=exc)
            )

    def _in_flight(self) -> list[asyncio.Task[None]]:
        return [t for t in (self._working, self._writing) if t is not None and not t.done()]

    def _close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _kick(self) -> None:
        """Start a write of the newest text now, or make sure one starts when allowed."""
        if self._closed or self._timer is not None or self.text == self._shown:
            return
        if self._writing is not None and not self._writing.done():
            return  # it looks again when done
        loop = asyncio.get_running_loop()
        wait = max(self._last + self._interval_s - loop.time(), self._sink.wait_s())
        if wait > 0:
            self._timer = loop.call_later(wait, self._on_timer)
            return
        self._last = loop.time()
        self._writing = asyncio.create_task(self._write(self.text))

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    async def _write(self, text: str) -> None:
        if self._working is not None:
            await asyncio.gather(self._working, return_exceptions=True)  # placeholder first
        try:
            if await self._sink.show(text):
                self._shown = text
        except Exception:  # live text is best effort; the final text catches up
            logger.exception("showing live text in %s failed", self._where)
            self._shown = text
        self._writing = None
        self._kick()  # text that arrived meanwhile
