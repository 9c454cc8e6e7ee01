"""The prompt shape and trimming from the oldest side within the context budget."""

from __future__ import annotations

import pytest

from bot.conversation import Message
from bot.llm.base import Prompt
from bot.prompt import PromptTooLong, build_prompt


def words(messages):
    # 1 token per word + 3 per message, like tests.support.backends.ScriptedLLM
    return sum(len(m["content"].split()) + 3 for m in messages)


class WordEncoder:
    """Counts words like ScriptedLLM, and records how often each method is called."""

    def __init__(self):
        self.encodes = 0
        self.counts = 0

    def encode(self, messages):
        self.encodes += 1
        return Prompt(list(messages), words(messages))

    def count_each(self, messages):
        self.counts += 1
        return [words([m]) for m in messages]


def build(*args, **kwargs):
    return build_prompt(*args, encoder=WordEncoder(), **kwargs).messages


def test_exact_shape_system_history_question():
    history = [Message("user", "hi there"), Message("assistant", "hello")]
    prompt = build("Persona.", history, "what now?", context_window=1000, max_new_tokens=10)
    assert prompt == [
        {"role": "system", "content": "Persona."},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what now?"},
    ]


def test_trims_oldest_first_keeping_room_for_the_answer():
    history = []
    for i in range(10):
        history += [Message("user", f"q{i} " * 5), Message("assistant", f"a{i} " * 5)]
    # system 1+3, question 1+3, each history message 5+3 = 8. Budget 100-50 = 50 → 5 messages fit,
    # but a leading orphaned answer is dropped too, leaving 4 (two whole turns).
    prompt = build("P", history, "now", context_window=100, max_new_tokens=50)
    assert words(prompt) <= 50
    assert prompt[0] == {"role": "system", "content": "P"}
    assert prompt[-1] == {"role": "user", "content": "now"}
    kept = prompt[1:-1]
    assert [m["content"].split()[0] for m in kept] == ["q8", "a8", "q9", "a9"]
    assert kept[0]["role"] == "user"


def test_all_history_dropped_when_only_the_question_fits():
    history = [Message("user", "x " * 100), Message("assistant", "y " * 100)]
    prompt = build("P", history, "q", context_window=20, max_new_tokens=5)
    assert prompt == [{"role": "system", "content": "P"}, {"role": "user", "content": "q"}]


def test_question_too_long_raises_with_sizes():
    with pytest.raises(PromptTooLong) as info:
        build("P", [], "w " * 100, context_window=50, max_new_tokens=10)
    assert info.value.budget == 40
    assert info.value.needed == 4 + 103


def test_a_prompt_that_fits_is_encoded_once():
    encoder = WordEncoder()
    history = [Message("user", "hi"), Message("assistant", "hello")]
    prompt = build_prompt("P", history, "q", encoder=encoder, context_window=500, max_new_tokens=10)
    assert (encoder.encodes, encoder.counts) == (1, 0)
    assert prompt.tokens == words(prompt.messages)


def test_a_long_history_costs_one_count_and_two_encodes():
    encoder = WordEncoder()
    history = [Message("user" if i % 2 == 0 else "assistant", "w " * 10) for i in range(400)]
    prompt = build_prompt(
        "P", history, "q", encoder=encoder, context_window=500, max_new_tokens=100
    )
    assert (encoder.encodes, encoder.counts) == (2, 1)
    assert prompt.tokens <= 400
    # As many of the newest messages as fit: one more would not.
    assert prompt.tokens + 13 > 400
