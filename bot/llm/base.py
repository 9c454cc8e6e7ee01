"""The LLM port: what the service needs from any backend that writes answers.

A backend streams `Delta` text chunks and ends with exactly one `Finished` that names the backend
and carries its token counts and timings. Failures are raised as `LLMError` subclasses so the
fallback chain can decide what to try next; nothing backend-specific leaks past this module.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict, runtime_checkable

from bot.sampling import SamplingSettings


class ChatMessage(TypedDict):
    """A role/content message as chat templates and the OpenAI API take them."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer, in order."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The end of a stream: who answered and what it cost."""

    backend: str  # e.g. "local:EXAONE-3.5-2.4B-Instruct" or "openai:gpt-4o-mini"
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None  # seconds from the call to the first text; None if no text
    total_s: float


StreamEvent = Delta | Finished


class LLMError(Exception):
    """A backend could not produce an answer. The message is for logs, never for chat users."""


class BackendUnavailable(LLMError):
    """The backend is disabled or could not be loaded/configured; retrying now will not help."""


class BackendTimeout(LLMError):
    """The backend did not produce text in time."""


class BackendBusy(LLMError):
    """The backend is at capacity; the question may overflow to another backend or wait."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"at capacity with {waiting} questions in progress")
        self.waiting = waiting


class BackendFailed(LLMError):
    """The backend raised or answered with an error while generating."""


@runtime_checkable
class TokenCounter(Protocol):
    def __call__(self, messages: Sequence[ChatMessage]) -> int:
        """How many prompt tokens these messages take, chat template included."""
        ...


class LLM(Protocol):
    """A backend. `start()` loads it once; `stream()` may then be called concurrently."""

    @property
    def name(self) -> str:
        """Backend name shown to users and in metrics, e.g. "local:EXAONE-3.5-2.4B-Instruct"."""
        ...

    @property
    def context_window(self) -> int:
        """Tokens the prompt and the answer share."""
        ...

    @property
    def unsupported(self) -> frozenset[str]:
        """Sampling keys this backend cannot honour (e.g. {"top_k"} for OpenAI)."""
        ...

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens for these messages; an over- rather than an under-estimate."""
        ...

    async def start(self) -> None:
        """Load or connect. Raises BackendUnavailable when this backend cannot serve."""
        ...

    def stream(
        self, messages: Sequence[ChatMessage], sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        """Generate an answer to `messages` (the last one is the user's question)."""
        ...

    async def aclose(self) -> None:
        """Release the model, connections and threads."""
        ...
