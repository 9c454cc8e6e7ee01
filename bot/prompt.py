"""The prompt: `[system persona (+ passages)] + history + [question]`, encoded once, trimmed to
the context.

Passages from the knowledge base follow the persona in the first system message, numbered, each
with its title and link, with the instruction to answer from them and cite them as `[n]`.
Trimming drops the oldest history first and keeps room for `max_new_tokens`; when even no
history leaves room for every passage, the lowest-ranked passages go next. The answering
backend encodes (the local model's own tokenizer, or a conservative estimate for servers). In the
common case the whole prompt fits and is encoded exactly once; only an over-long one costs one
batched per-message count and a second encode. This runs the tokenizer: call it off the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.conversation import Message
from bot.knowledge.passages import Passage
from bot.llm.base import ChatMessage, Prompt

GROUNDING = (
    "Answer from the numbered passages of the team's documents below, and cite each passage "
    "you use as [n]. If they do not answer the question, say that the documents do not cover "
    "it instead of guessing."
)


class Encoder(Protocol):
    def encode(self, messages: Sequence[ChatMessage]) -> Prompt: ...

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]: ...


class PromptTooLong(Exception):
    """Even the persona and the question alone do not fit."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"prompt needs {needed} tokens; {budget} are available")
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True, slots=True)
class Grounded:
    """A prompt and the passages it kept, numbered [1]..[n] in this order."""

    prompt: Prompt
    passages: list[Passage]


def system_message(persona: str, passages: Sequence[Passage]) -> str:
    if not passages:
        return persona
    blocks = []
    for n, passage in enumerate(passages, 1):
        where = f"{passage.title} › {passage.heading}" if passage.heading else passage.title
        blocks.append(f"[{n}] {where} ({passage.link})\n{passage.text}")
    return f"{persona}\n\n{GROUNDING}\n\n" + "\n\n".join(blocks)


def build_prompt(
    persona: str,
    history: Sequence[Message],
    question: str,
    *,
    encoder: Encoder,
    context_window: int,
    max_new_tokens: int,
    passages: Sequence[Passage] = (),
) -> Prompt:
    return build_grounded(
        persona, history, question, encoder=encoder, context_window=context_window,
        max_new_tokens=max_new_tokens, passages=passages,
    ).prompt  # fmt: skip


def build_grounded(
    persona: str,
    history: Sequence[Message],
    question: str,
    *,
    encoder: Encoder,
    context_window: int,
    max_new_tokens: int,
    passages: Sequence[Passage] = (),
) -> Grounded:
    """The prompt with as many of `passages` (best first) as fit: history is trimmed first,
    then the lowest-ranked passages are dropped, one at a time."""
    ranked = list(passages)
    try:
        return Grounded(
            _fit(system_message(persona, ranked), history, question, encoder=encoder,
                 context_window=context_window, max_new_tokens=max_new_tokens),
            ranked,
        )  # fmt: skip
    except PromptTooLong:
        if not ranked:
            raise
    for kept in range(len(ranked) - 1, -1, -1):
        try:
            prompt = _fit(
                system_message(persona, ranked[:kept]), (), question, encoder=encoder,
                context_window=context_window, max_new_tokens=max_new_tokens,
            )  # fmt: skip
            return Grounded(prompt, ranked[:kept])
        except PromptTooLong:
            if kept == 0:
                raise
    raise AssertionError("unreachable")


def _fit(
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
