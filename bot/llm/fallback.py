"""Local first, GPT next: the chain of backends the service talks to.

The primary (in-process EXAONE, or an OpenAI-compatible server via LLM_BASE_URL) answers when it
can. GPT answers when the primary is disabled, failed to load, raised or timed out before any
text reached the user. Once text has been streamed, a failure is reported instead: splicing two
models' answers would mislead. A circuit breaker keeps a broken primary from being retried, and
timing out, on every message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from bot.llm.base import (
    LLM,
    BackendBusy,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    LLMError,
    StreamEvent,
)
from bot.ops import metrics
from bot.sampling import SamplingSettings

logger = logging.getLogger(__name__)


class NoBackendAvailable(LLMError):
    """Neither the local model nor GPT can answer."""


class CircuitBreaker:
    """Closed → open after `threshold` consecutive failures; after `cooldown_s` one trial call
    is let through (half-open): success closes it, failure opens it again."""

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

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def release_trial(self) -> None:
        """The trial call did not test the backend (it was busy): let another one try."""
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


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    role: Literal["primary", "fallback"]
    state: str  # "ready", "circuit open", "unavailable: <reason>"
    unsupported: frozenset[str]

    @property
    def usable(self) -> bool:
        return not self.state.startswith("unavailable")


class _Slot:
    def __init__(self, backend: LLM, role: Literal["primary", "fallback"]) -> None:
        self.backend = backend
        self.role: Literal["primary", "fallback"] = role
        self.unavailable: str | None = "not started"
        self.breaker = CircuitBreaker()


class FallbackLLM:
    """Implements the LLM port over an ordered pair of backends."""

    def __init__(
        self,
        primary: LLM | None,
        fallback: LLM | None,
        *,
        disabled_reason: str = "disabled",
        breaker_threshold: int = 2,
        breaker_cooldown_s: float = 30.0,
        stall_timeout_s: float = 120.0,
        overflow_to_fallback: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.overflow_to_fallback = overflow_to_fallback
        self._slots: list[_Slot] = []
        for backend, role in ((primary, "primary"), (fallback, "fallback")):
            if backend is not None:
                slot = _Slot(backend, role)  # type: ignore[arg-type]
                # `clock` is the breakers' (tests skip the cooldown with a fake one).
                slot.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s, clock)
                self._slots.append(slot)
        self._disabled_reason = disabled_reason

    async def start(self) -> None:
        for slot in self._slots:
            try:
                await slot.backend.start()
                slot.unavailable = None
                logger.info("%s backend ready: %s", slot.role, slot.backend.name)
            except BackendUnavailable as exc:
                slot.unavailable = str(exc)
                logger.warning("%s backend %s unavailable: %s", slot.role, slot.backend.name, exc)

    async def aclose(self) -> None:
        for slot in self._slots:
            await slot.backend.aclose()

    def status(self) -> list[BackendStatus]:
        out = []
        for slot in self._slots:
            if slot.unavailable is not None:
                state = f"unavailable: {slot.unavailable}"
            elif slot.breaker.state == "open":
                state = "circuit open after failures; retrying soon"
            else:
                state = "ready"
            out.append(BackendStatus(slot.backend.name, slot.role, state, slot.backend.unsupported))
        return out

    @property
    def ready(self) -> bool:
        return any(slot.unavailable is None for slot in self._slots)

    def _preferred(self) -> _Slot | None:
        usable = [s for s in self._slots if s.unavailable is None]
        for slot in usable:
            if slot.breaker.state != "open":
                return slot
        return usable[0] if usable else None

    # The LLM port, answered by whichever backend would answer now.

    @property
    def name(self) -> str:
        slot = self._preferred()
        return slot.backend.name if slot else "none"

    @property
    def context_window(self) -> int:
        slot = self._preferred()
        return slot.backend.context_window if slot else 0

    @property
    def unsupported(self) -> frozenset[str]:
        slot = self._preferred()
        return slot.backend.unsupported if slot else frozenset()

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        slot = self._preferred()
        if slot is None:
            raise self._no_backend()
        return slot.backend.count_tokens(messages)

    async def stream(
        self, messages: Sequence[ChatMessage], sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        errors: list[str] = []
        busy: BackendBusy | None = None
        for slot in self._slots:
            skip = self._skip_reason(slot)
            if skip is not None:
                errors.append(f"{slot.backend.name}: {skip}")
                self._passed_on(slot, "unavailable" if slot.unavailable else "circuit_open")
                continue
            started = False
            try:
                async for event in self._guarded(slot.backend.stream(messages, sampling)):
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
                errors.append(f"{slot.backend.name}: {exc}")
                if not self.overflow_to_fallback:
                    raise
                self._passed_on(slot, "busy")
            except Exception as exc:  # any failure of one backend is a reason to try the next
                slot.breaker.failure()
                errors.append(f"{slot.backend.name}: {type(exc).__name__}: {exc}")
                logger.warning(
                    "%s backend %s failed: %s: %s",
                    slot.role,
                    slot.backend.name,
                    type(exc).__name__,
                    exc,
                )
                if started:
                    raise
                self._passed_on(slot, "timeout" if isinstance(exc, BackendTimeout) else "failed")
        if busy is not None:
            raise busy
        raise self._no_backend(errors)

    @staticmethod
    def _skip_reason(slot: _Slot) -> str | None:
        if slot.unavailable is not None:
            return slot.unavailable
        return None if slot.breaker.allow() else "circuit open"

    def _passed_on(self, slot: _Slot, reason: str) -> None:
        if slot is not self._slots[-1]:
            metrics.FALLBACKS.labels(slot.backend.name, reason).inc()

    async def _guarded(self, events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
        """Pass events through, raising BackendTimeout when the backend goes quiet for longer
        than `stall_timeout_s` (before the first text, or between chunks): a hung model must
        not hold a channel's turn forever, whatever the backend's own timeouts do."""
        iterator = aiter(events)
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: no extra task per streamed chunk.
                    async with asyncio.timeout(self.stall_timeout_s):
                        event = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise BackendTimeout(f"no output for {self.stall_timeout_s:g}s") from None
                yield event
        finally:
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                await closer()

    def _no_backend(self, errors: Sequence[str] = ()) -> NoBackendAvailable:
        detail = "; ".join(errors) if errors else "no backend configured"
        return NoBackendAvailable(detail)
