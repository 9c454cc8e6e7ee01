"""The prompt: `[system persona] + history + [question]`, trimmed to the model's context.

Trimming drops the oldest history first and keeps room for `max_new_tokens`. Token counts come
from the answering backend (the local model's own tokenizer, or a conservative estimate for GPT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.conversation import Message
from bot.llm.base import ChatMessage

CountTokens = Callable[[Sequence[ChatMessage]], int]


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
    count_tokens: CountTokens,
    context_window: int,
    max_new_tokens: int,
) -> list[ChatMessage]:
    budget = context_window - max_new_tokens
    system: ChatMessage = {"role": "system", "content": persona}
    user: ChatMessage = {"role": "user", "content": question}
    past = [m.as_chat() for m in history]

    def prompt(dropped: int) -> list[ChatMessage]:
        kept = past[dropped:]
        # A conversation should not open with an orphaned answer whose question was dropped.
        while kept and kept[0]["role"] == "assistant":
            kept = kept[1:]
        return [system, *kept, user]

    if count_tokens(prompt(0)) <= budget:
        return prompt(0)
    minimal = prompt(len(past))
    needed = count_tokens(minimal)
    if needed > budget:
        raise PromptTooLong(needed, budget)
    # Binary search the fewest dropped messages that fit: O(log n) tokenizer calls instead of n.
    lo, hi = 1, len(past)  # prompt(hi) fits, prompt(lo - 1) does not
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(prompt(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return prompt(lo)
