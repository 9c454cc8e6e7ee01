"""The LLM port: what the service needs from any backend that writes answers.

A backend streams `Delta` text chunks and ends with exactly one `Finished` that names the backend
and carries its token counts and timings. Failures are raised as `LLMError` subclasses so the
fallback chain can decide what to try next; nothing backend-specific leaks past this module.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

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


class RequestRejected(LLMError):
    """The backend refused this one request (HTTP 400/413/422, …): the request is at fault, not
    the backend, so the circuit breaker ignores it and other requests still go there.
    `too_long`: the prompt (with room for the answer) does not fit the backend's context."""

    def __init__(self, message: str, *, too_long: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long


class RateLimited(LLMError):
    """The backend asked us to slow down (HTTP 429) and the retries are spent: it is healthy,
    so the breaker ignores it, but this question must go elsewhere or wait."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """The messages of one question, encoded once by the backend that will answer them.

    `ids` are the prompt's token ids when the backend has its own tokenizer (the in-process model
    generates from them without encoding again); None for servers that take the messages.
    """

    messages: list[ChatMessage]
    tokens: int  # exact with `ids`, else the backend's over-estimate
    ids: list[int] | None = None


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

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt:
        """The prompt for these messages (chat template, generation prompt). May block on a
        tokenizer: callers run it off the event loop."""
        ...

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Tokens each message takes inside the prompt, an over- rather than an under-estimate,
        in one pass (used only to choose what to trim when a prompt does not fit). May block."""
        ...

    async def start(self) -> None:
        """Load or connect. Raises BackendUnavailable when this backend cannot serve."""
        ...

    def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        """Generate an answer to `prompt` (its last message is the user's question)."""
        ...

    async def aclose(self) -> None:
        """Release the model, connections and threads."""
        ...
