"""The shared splitter: within the limit, at paragraph or code-block boundaries, fences intact."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.platforms.text import split_message

FENCE = re.compile(r"^\s*```", re.M)


def fences_balanced(message: str) -> bool:
    return len(FENCE.findall(message)) % 2 == 0


def content(text: str) -> str:
    """The text without fence lines and whitespace: what a reader must find in the messages."""
    kept = [line for line in text.splitlines() if not FENCE.match(line)]
    return "".join("".join(kept).split())


def joined(messages: list[str]) -> str:
    return "\n".join(messages)


def test_short_text_is_one_message():
    assert split_message("hello", 2000) == ["hello"]
    assert split_message("", 2000) == []


def test_splits_at_paragraphs():
    paragraphs = [f"Paragraph {i}. " + "word " * 30 for i in range(10)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    messages = split_message(text, 400)
    assert all(len(m) <= 400 for m in messages)
    for m in messages:
        assert m.startswith("Paragraph")  # every message starts at a paragraph boundary
    assert content(joined(messages)) == content(text)


def test_never_splits_inside_a_code_block_that_fits():
    code = "```python\n" + "".join(f"print({i})\n" for i in range(40)) + "```\n"
    text = "Intro paragraph.\n\n" + "x " * 100 + "\n\n" + code + "\nAfter the code."
    messages = split_message(text, 500)
    assert all(len(m) <= 500 for m in messages)
    holder = [m for m in messages if "print(0)" in m]
    assert len(holder) == 1 and "print(39)" in holder[0]  # the whole block in one message
    assert all(fences_balanced(m) for m in messages)


def test_a_code_block_longer_than_the_limit_is_reopened_with_its_language():
    code = "```sql\n" + "".join(f"SELECT {i} FROM t;\n" for i in range(200)) + "```"
    messages = split_message(code, 300)
    assert len(messages) > 1
    for m in messages:
        assert len(m) <= 300
        assert m.startswith("```sql\n") and m.endswith("```")
        assert fences_balanced(m)
    assert content(joined(messages)) == content(code)


def test_4500_character_answer_with_code_for_discord():
    prose = "\n\n".join(f"Sentence number {i} is here. " * 12 for i in range(8))
    code = "```js\n" + "".join(f"console.log({i});\n" for i in range(120)) + "```"
    text = prose + "\n\n" + code + "\n\nThat is all."
    assert len(text) > 4500
    messages = split_message(text, 2000)
    assert all(len(m) <= 2000 for m in messages)
    assert all(fences_balanced(m) for m in messages)
    assert content(joined(messages)) == content(text)


def test_one_long_line_is_cut_at_spaces():
    text = "word " * 1000
    messages = split_message(text, 100)
    assert all(len(m) <= 100 for m in messages)
    assert all(not m.startswith(" ") and "wor d" not in m for m in messages)
    assert content(joined(messages)) == content(text)


def test_korean_text_without_spaces_is_hard_cut_within_the_limit():
    text = "가" * 5000
    messages = split_message(text, 2000)
    assert [len(m) for m in messages] == [2000, 2000, 1000]


def test_limit_too_small():
    with pytest.raises(ValueError):
        split_message("x" * 100, 10)


blocks = st.one_of(
    st.text(alphabet=st.sampled_from("abc 가나\n.?"), min_size=1, max_size=300),
    st.builds(
        lambda lang, lines: f"```{lang}\n" + "".join(line + "\n" for line in lines) + "```",
        st.sampled_from(["", "py", "bash"]),
        st.lists(st.text(alphabet="xyz ()=;", max_size=120), max_size=40),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(blocks, min_size=1, max_size=12), st.integers(min_value=60, max_value=800))
def test_property_within_limit_balanced_and_nothing_lost(parts, limit):
    text = "\n\n".join(parts)
    messages = split_message(text, limit)
    assert all(len(m) <= limit for m in messages)
    assert all(fences_balanced(m) for m in messages)
    assert content(joined(messages)) == content(text)


def test_a_code_line_longer_than_a_message_keeps_every_closing_fence_on_its_own_line():
    # Found by the property test above: the hard-cut piece had no newline, so the closing fence
    # was glued to it and the message's fences no longer balanced.
    text = "```\n" + ";" * 54 + "\n```"
    messages = split_message(text, 60)
    assert len(messages) > 1
    assert all(len(m) <= 60 and fences_balanced(m) for m in messages)
    assert content(joined(messages)) == content(text)
