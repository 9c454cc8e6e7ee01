"""The prompt: `[system persona] + history + [question]`, encoded once, trimmed to the context.

Trimming drops the oldest history first and keeps room for `max_new_tokens`. The answering
backend encodes (the local model's own tokenizer, or a conservative estimate for servers). In the
common case the whole prompt fits and is encoded exactly once; only an over-long one costs one
batched per-message count and a second encode. This runs the tokenizer: call it off the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bot.conversation import Message
from bot.llm.base import ChatMessage, Prompt


class Encoder(Protocol):
    def encode(self, messages: Sequence[ChatMessage]) -> Prompt: ...

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]: ...


class PromptTooLong(Exception):
    """Even the persona and the question alone do not fit."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"prompt needs {needed} tokens; {budget} are available")
        self.needed = needed
        self.budget = budget


def build_prompt(
    persona: str,
    history: Sequence[Message],
    question: str,
    *,
    encoder: Encoder,
    context_window: int,
    max_new_tokens: int,
) -> Prompt:
    budget = context_window - max_new_tokens
    system: ChatMessage = {"role": "system", "content": persona}
    user: ChatMessage = {"role": "user", "content": question}
    past = [m.as_chat() for m in history]

    def messages(dropped: int) -> list[ChatMessage]:
        kept = past[dropped:]
        # A conversation should not open with an orphaned answer whose question was dropped.
        while kept and kept[0]["role"] == "assistant":
            kept = kept[1:]
        return [system, *kept, user]

    prompt = encoder.encode(messages(0))
    if prompt.tokens <= budget:
        return prompt
    # Over budget: per-message counts (over-estimates) say how many of the oldest to drop,
    # then the chosen prompt is encoded; a rare under-drop costs one more message each time.
    counts = encoder.count_each(past)
    excess = prompt.tokens - budget
    dropped = 0
    while dropped < len(past) and excess > 0:
        excess -= counts[dropped]
        dropped += 1
    while True:
        prompt = encoder.encode(messages(dropped))
        if prompt.tokens <= budget:
            return prompt
        if dropped >= len(past):
            raise PromptTooLong(prompt.tokens, budget)
        dropped += 1
