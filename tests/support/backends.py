"""Backends for service tests: real implementations of our own LLM port (not mocks of a library).

`ScriptedLLM` answers instantly from a function of the prompt and records every call; it can be
told to raise, hang or fail to start, so fallback paths are exercised through LLMChain itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from bot.llm.base import (
    BackendFailed,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    Prompt,
    StreamEvent,
)
from bot.sampling import SamplingSettings


def echo(messages: Sequence[ChatMessage]) -> str:
    return f"echo: {messages[-1]['content']}"


@dataclass
class Call:
    messages: list[ChatMessage]
    sampling: SamplingSettings


@dataclass
class ScriptedLLM:
    label: str = "scripted"
    answer: Callable[[Sequence[ChatMessage]], str] = echo
    context_window: int = 4096
    unsupported: frozenset[str] = frozenset()
    fail_start: str | None = None  # start() raises BackendUnavailable with this reason
    start_error: Exception | None = None  # start() raises this (e.g. a failed warm-up)
    start_hang_s: float = 0.0  # start() sleeps this long first
    raise_error: Exception | None = None  # raised before any text
    raise_after_text: Exception | None = None  # raised after the first chunk
    hang_s: float = 0.0  # sleep before the first chunk
    chunk_size: int = 4
    calls: list[Call] = field(default_factory=list)
    started: bool = False
    closed: bool = False

    @property
    def name(self) -> str:
        return f"test:{self.label}"

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]:
        # One token per whitespace-separated word plus 3 per message: easy to reason about.
        return [len(m["content"].split()) + 3 for m in messages]

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt:
        return Prompt(list(messages), tokens=sum(self.count_each(messages)), ids=None)

    async def start(self) -> None:
        if self.start_hang_s:
            await asyncio.sleep(self.start_hang_s)
        if self.fail_start:
            raise BackendUnavailable(self.fail_start)
        if self.start_error is not None:
            raise self.start_error
        self.started = True

    async def aclose(self) -> None:
        self.closed = True

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        began = time.monotonic()
        messages = prompt.messages
        self.calls.append(Call(list(messages), sampling))
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.raise_error is not None:
            raise self.raise_error
        text = self.answer(messages)
        first = None
        for i in range(0, len(text), self.chunk_size):
            if first is None:
                first = time.monotonic() - began
            yield Delta(text[i : i + self.chunk_size])
            if self.raise_after_text is not None:
                raise self.raise_after_text
            await asyncio.sleep(0)
        yield Finished(
            backend=self.name,
            prompt_tokens=prompt.tokens,
            completion_tokens=len(text.split()),
            first_token_s=first,
            total_s=time.monotonic() - began,
        )


def failing(message: str = "boom") -> BackendFailed:
    return BackendFailed(message)
