"""Primary first, GPT next: the chain of backends the service talks to.

The primary (in-process EXAONE, or an OpenAI-compatible server via LLM_BASE_URL) answers when it
can. GPT answers when the primary is disabled, failed to start, raised or timed out before any
text reached the user. Once text has been streamed, a failure is reported instead: splicing two
models' answers would mislead. A circuit breaker keeps a broken primary from being retried, and
timing out, on every message; it counts only the backend's health (connection, timeout, 5xx, an
engine crash), never a refusal of one request (4xx such as a prompt too long for the context,
or a rate limit): one channel's bad request must not take a backend away from the others.
When no backend answers, `NoBackendAvailable.causes` says why, typed, for the user's message.
Each backend has its own stall timeout: the local model's and GPT's are set separately
(LLM_TIMEOUT_SECONDS, OPENAI_TIMEOUT_SECONDS).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from bot.llm.base import (
    LLM,
    BackendBusy,
    BackendFailed,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    LLMError,
    Prompt,
    RateLimited,
    RequestRejected,
    StreamEvent,
)
from bot.ops import metrics
from bot.sampling import SamplingSettings

logger = logging.getLogger(__name__)

Role = Literal["primary", "fallback"]


class CircuitOpen(LLMError):
    """The backend failed lately and its breaker is open: it is skipped until a trial call."""


class NoBackendAvailable(LLMError):
    """Neither the local model nor GPT can answer. `causes` says why, one typed error per
    backend in chain order (BackendUnavailable, CircuitOpen, BackendTimeout, RateLimited,
    RequestRejected, BackendFailed, …); empty when no backend is configured at all."""

    def __init__(self, message: str, causes: Sequence[LLMError] = ()) -> None:
        super().__init__(message)
        self.causes = tuple(causes)


class CircuitBreaker:
    """Closed → open after `threshold` consecutive failures; after `cooldown_s` one trial call
    is let through (half-open): success closes it, failure opens it again, and a trial that
    ends without testing the backend (busy, cancelled) lets the next call try."""

    def __init__(
        self,
        threshold: int = 2,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> Literal["closed", "open", "half-open"]:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.cooldown_s:
            return "half-open"
        return "open"

    def acquire(self) -> Literal["call", "trial"] | None:
        """Whether a call may go through now: "call" (closed), "trial" (the one half-open call,
        which the caller must end with success(), failure() or release_trial()), or None."""
        state = self.state
        if state == "closed":
            return "call"
        if state == "half-open" and not self._trial_running:
            self._trial_running = True
            return "trial"
        return None

    def release_trial(self) -> None:
        """The trial call did not test the backend (it was busy, or cancelled): let another
        one try."""
        self._trial_running = False

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_running = False

    def failure(self) -> None:
        self._failures += 1
        self._trial_running = False
        if self._opened_at is not None or self._failures >= self.threshold:
            self._opened_at = self._clock()


class BackendState(enum.Enum):
    READY = "ready"
    CIRCUIT_OPEN = "circuit open"  # failing lately: skipped until a trial call succeeds
    UNAVAILABLE = "unavailable"  # disabled, or failed to start: never tried


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    role: Role
    state: BackendState
    detail: str  # why it is unavailable or its circuit open; "" when ready
    unsupported: frozenset[str]

    @property
    def usable(self) -> bool:
        return self.state is not BackendState.UNAVAILABLE

    def describe(self) -> str:
        """One line for people: "ready", "circuit open after failures; retrying soon",
        "unavailable: <reason>"."""
        if self.state is BackendState.UNAVAILABLE:
            return f"unavailable: {self.detail}"
        return f"{self.state.value} {self.detail}" if self.detail else self.state.value


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend of the chain, with its own stall timeout: the longest silence (before the
    first text or between chunks) before the chain gives up on it."""

    llm: LLM
    stall_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")


class _Slot:
    def __init__(self, backend: Backend, role: Role, breaker: CircuitBreaker) -> None:
        self.llm = backend.llm
        self.stall_timeout_s = backend.stall_timeout_s
        self.role: Role = role
        self.unavailable: str | None = "not started"
        self.breaker = breaker


class LLMChain:
    """Implements the LLM port over a primary and a fallback backend (either may be None).

    A plain LLM is taken as `Backend(llm)` with the default stall timeout.
    """

    def __init__(
        self,
        primary: Backend | LLM | None,
        fallback: Backend | LLM | None = None,
        *,
        breaker_threshold: int = 2,
        breaker_cooldown_s: float = 30.0,
        overflow_to_fallback: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.overflow_to_fallback = overflow_to_fallback
        self._slots: list[_Slot] = []
        roles: tuple[Role, Role] = ("primary", "fallback")
        for backend, role in zip((primary, fallback), roles, strict=True):
            if backend is None:
                continue
            if not isinstance(backend, Backend):
                backend = Backend(backend)
            # `clock` is the breakers' (tests skip the cooldown with a fake one).
            breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s, clock)
            self._slots.append(_Slot(backend, role, breaker))

    async def start(self) -> None:
        """Start every backend. One that cannot start (for any reason: a failed load, a failed
        or slow warm-up) is closed, to free its memory and threads, and marked unavailable."""
        for slot in self._slots:
            try:
                await slot.llm.start()
            except Exception as exc:
                reason = str(exc) if isinstance(exc, BackendUnavailable) else _describe(exc)
                slot.unavailable = reason or type(exc).__name__
                logger.warning("%s backend %s unavailable: %s", slot.role, slot.llm.name, reason)
                try:
                    await slot.llm.aclose()
                except Exception as close_error:  # closing is best effort; the reason stands
                    logger.warning("closing %s failed: %s", slot.llm.name, _describe(close_error))
            else:
                slot.unavailable = None
                logger.info("%s backend ready: %s", slot.role, slot.llm.name)

    async def aclose(self) -> None:
        for slot in self._slots:
            await slot.llm.aclose()

    def status(self) -> list[BackendStatus]:
        return [self._status(slot) for slot in self._slots]

    def answering(self) -> BackendStatus | None:
        """The backend that would answer a question now, or None when none would."""
        for slot in self._slots:
            if slot.unavailable is None and slot.breaker.state != "open":
                return self._status(slot)
        return None

    @property
    def ready(self) -> bool:
        return any(slot.unavailable is None for slot in self._slots)

    # The LLM port, answered by whichever backend would answer now.

    @property
    def name(self) -> str:
        return self._preferred().llm.name

    @property
    def context_window(self) -> int:
        return self._preferred().llm.context_window

    @property
    def unsupported(self) -> frozenset[str]:
        return self._preferred().llm.unsupported

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt:
        return self._preferred().llm.encode(messages)

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._preferred().llm.count_each(messages)

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        errors: list[str] = []
        causes: list[LLMError] = []
        busy: BackendBusy | None = None
        for slot in self._slots:
            permit = None if slot.unavailable is not None else slot.breaker.acquire()
            if permit is None:
                errors.append(f"{slot.llm.name}: {slot.unavailable or 'circuit open'}")
                causes.append(
                    BackendUnavailable(slot.unavailable)
                    if slot.unavailable
                    else CircuitOpen(f"{slot.llm.name}: circuit open")
                )
                self._passed_on(slot, "unavailable" if slot.unavailable else "circuit_open")
                continue
            started = False
            try:
                # aclosing: a consumer that leaves closes the backend's stream now, not at GC.
                guarded = self._guarded(slot, slot.llm.stream(prompt, sampling))
                async with contextlib.aclosing(guarded) as events:
                    async for event in events:
                        if isinstance(event, Delta) and event.text:
                            started = True
                        if isinstance(event, Finished):
                            slot.breaker.success()
                        yield event
                return
            except BackendBusy as exc:
                # Capacity, not a fault: the breaker stays closed.
                slot.breaker.release_trial()
                busy = busy or exc
                errors.append(f"{slot.llm.name}: {exc}")
                causes.append(exc)
                if not self.overflow_to_fallback:
                    raise
                self._passed_on(slot, "busy")
            except (RequestRejected, RateLimited) as exc:
                # The backend answered, refusing this one request (too long, a bad parameter) or
                # asking us to slow down: it is healthy, so other channels keep it. The next
                # backend may still take the request (a larger context, its own rate limit).
                slot.breaker.release_trial()
                errors.append(f"{slot.llm.name}: {exc}")
                causes.append(exc)
                logger.warning("%s backend %s refused: %s", slot.role, slot.llm.name, exc)
                if started:
                    raise
                self._passed_on(
                    slot, "rejected" if isinstance(exc, RequestRejected) else "rate_limited"
                )
            except Exception as exc:  # any failure of one backend is a reason to try the next
                slot.breaker.failure()
                errors.append(f"{slot.llm.name}: {_describe(exc)}")
                causes.append(exc if isinstance(exc, LLMError) else BackendFailed(_describe(exc)))
                logger.warning("%s backend %s failed: %s", slot.role, slot.llm.name, _describe(exc))
                if started:
                    raise
                self._passed_on(slot, "timeout" if isinstance(exc, BackendTimeout) else "failed")
            except BaseException:
                # Cancelled, or the consumer left (GeneratorExit): this says nothing about the
                # backend, but a half-open trial must end here or no call would ever try again.
                if permit == "trial":
                    slot.breaker.release_trial()
                raise
        if busy is not None and not any(isinstance(c, RequestRejected) for c in causes):
            raise busy
        raise NoBackendAvailable("; ".join(errors) if errors else "no backend configured", causes)

    def _status(self, slot: _Slot) -> BackendStatus:
        if slot.unavailable is not None:
            state, detail = BackendState.UNAVAILABLE, slot.unavailable
        elif slot.breaker.state == "open":
            state, detail = BackendState.CIRCUIT_OPEN, "after failures; retrying soon"
        else:
            state, detail = BackendState.READY, ""
        return BackendStatus(slot.llm.name, slot.role, state, detail, slot.llm.unsupported)

    def _preferred(self) -> _Slot:
        """The backend that encodes and sizes prompts: the first usable one whose circuit is not
        open, else the first usable one."""
        usable = [s for s in self._slots if s.unavailable is None]
        for slot in usable:
            if slot.breaker.state != "open":
                return slot
        if usable:
            return usable[0]
        reasons = [f"{s.llm.name}: {s.unavailable}" for s in self._slots]
        raise NoBackendAvailable(
            "; ".join(reasons) if reasons else "no backend configured",
            [BackendUnavailable(f"{s.llm.name}: {s.unavailable}") for s in self._slots],
        )

    def _passed_on(self, slot: _Slot, reason: str) -> None:
        if slot is not self._slots[-1]:
            metrics.FALLBACKS.labels(slot.llm.name, reason).inc()

    @staticmethod
    async def _guarded(
        slot: _Slot, events: AsyncGenerator[StreamEvent, None]
    ) -> AsyncGenerator[StreamEvent, None]:
        """Pass events through, raising BackendTimeout when the backend goes quiet for longer
        than its stall timeout (before the first text, or between chunks): a hung model must
        not hold a channel's turn forever, whatever the backend's own timeouts do."""
        timeout_s = slot.stall_timeout_s
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: no extra task per streamed chunk.
                    async with asyncio.timeout(timeout_s):
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise BackendTimeout(f"no output for {timeout_s:g}s") from None
                yield event
        finally:
            await events.aclose()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
