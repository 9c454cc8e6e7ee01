"""What the service needs from outside the core, as interfaces: the models (bot.llm.chain), the
knowledge base (bot.knowledge) and an observer for metrics (bot.ops.metrics). Pure: the
implementations live downstream of nothing here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from bot.knowledge.passages import Hit
from bot.llm.base import ChatMessage, Prompt, StreamEvent
from bot.llm.chain import BackendStatus
from bot.sampling import SamplingSettings


class Models(Protocol):
    """What the service needs of the LLM chain (bot.llm.chain.LLMChain); the runtime starts
    and closes it."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    @property
    def context_window(self) -> int: ...

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt: ...

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def stream(self, prompt: Prompt, sampling: SamplingSettings) -> AsyncIterator[StreamEvent]: ...

    def status(self) -> list[BackendStatus]: ...

    def answering(self) -> BackendStatus | None: ...


class Knowledge(Protocol):
    """What the service needs of the knowledge base (bot.knowledge.base.KnowledgeBase)."""

    async def search(
        self, collection: str, question: str, *, limit: int, version: int | None = None
    ) -> list[Hit]: ...

    async def collections(self) -> list[str]: ...


class Observer(Protocol):
    """Where the service reports what happened (bot.ops.metrics implements it for /metrics)."""

    def question(self, platform: str) -> None: ...

    def answered(
        self, platform: str, backend: str, total_s: float, first_token_s: float | None,
        tokens_per_s: float | None,
    ) -> None: ...  # fmt: skip

    def failed(self, platform: str, reason: str) -> None: ...

    def active(self, change: int) -> None: ...

    def voted(self, platform: str, vote: str) -> None: ...

    def handed_off(self, platform: str) -> None: ...

    def no_passage(self, platform: str) -> None: ...


class Unobserved:
    """The observer when none is given."""

    def question(self, platform: str) -> None:
        pass

    def answered(
        self, platform: str, backend: str, total_s: float, first_token_s: float | None,
        tokens_per_s: float | None,
    ) -> None:  # fmt: skip
        pass

    def failed(self, platform: str, reason: str) -> None:
        pass

    def active(self, change: int) -> None:
        pass

    def voted(self, platform: str, vote: str) -> None:
        pass

    def handed_off(self, platform: str) -> None:
        pass

    def no_passage(self, platform: str) -> None:
        pass
