"""The /llm-settings grammar and the contract's table: every key, valid and invalid."""

from __future__ import annotations

import pytest

from bot.sampling import (
    Change,
    Forget,
    Log,
    Reset,
    SettingsError,
    Show,
    parse_command,
)

LIMIT = 2048


def parse(text: str):
    return parse_command(text, max_new_tokens_limit=LIMIT)


@pytest.mark.parametrize(
    "text", ["", "   ", "show", "SHOW", " show ", "/llm-settings", "/llm-settings show"]
)
def test_show(text):
    assert parse(text) == Show()


@pytest.mark.parametrize(
    ("text", "expected"), [("reset", Reset()), ("log", Log()), ("forget", Forget())]
)
def test_words(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("temperature 0.8", {"temperature": 0.8}),
        ("temperature=0.8", {"temperature": 0.8}),
        ("temperature = 0.8", {"temperature": 0.8}),
        ("temperature=0.7 top_p=0.9 top_k=50", {"temperature": 0.7, "top_p": 0.9, "top_k": 50}),
        ("temperature 0.7 top_p 0.9", {"temperature": 0.7, "top_p": 0.9}),
        ("temperature=0.7 top_k 5", {"temperature": 0.7, "top_k": 5}),
        ("/llm-settings temperature 0.8", {"temperature": 0.8}),
        ("TEMPERATURE 2", {"temperature": 2.0}),
        ("temperature 1e-3", {"temperature": 0.001}),
        ("temperature .5", {"temperature": 0.5}),
        ("top_k 1", {"top_k": 1}),
        ("top_k 1000", {"top_k": 1000}),
        ("top_p 1", {"top_p": 1.0}),
        ("top_p 0.01", {"top_p": 0.01}),
        ("max_new_tokens 1", {"max_new_tokens": 1}),
        (f"max_new_tokens {LIMIT}", {"max_new_tokens": LIMIT}),
    ],
)
def test_changes(text, values):
    assert parse(text) == Change(values)


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("true", True),
        ("false", False),
        ("on", True),
        ("off", False),
        ("yes", True),
        ("no", False),
        ("1", True),
        ("0", False),
        ("True", True),
        ("OFF", False),
    ],
)
def test_do_sample_words(word, value):
    assert parse(f"do_sample {word}") == Change({"do_sample": value})
    assert parse(f"do_sample={word}") == Change({"do_sample": value})


@pytest.mark.parametrize(
    ("text", "key", "range_text"),
    [
        ("temperature 0", "temperature", "0 < temperature ≤ 2"),
        ("temperature -1", "temperature", "0 < temperature ≤ 2"),
        ("temperature 2.01", "temperature", "0 < temperature ≤ 2"),
        ("temperature abc", "temperature", "0 < temperature ≤ 2"),
        ("temperature nan", "temperature", "0 < temperature ≤ 2"),
        ("temperature inf", "temperature", "0 < temperature ≤ 2"),
        ("temperature 1,5", "temperature", "0 < temperature ≤ 2"),
        ("top_k 0", "top_k", "1 to 1000"),
        ("top_k 1001", "top_k", "1 to 1000"),
        ("top_k 5.0", "top_k", "1 to 1000"),
        ("top_k ten", "top_k", "1 to 1000"),
        ("top_p 0", "top_p", "0 < top_p ≤ 1"),
        ("top_p 1.5", "top_p", "0 < top_p ≤ 1"),
        ("top_p -0.1", "top_p", "0 < top_p ≤ 1"),
        ("max_new_tokens 0", "max_new_tokens", f"1 to {LIMIT}"),
        (f"max_new_tokens {LIMIT + 1}", "max_new_tokens", f"1 to {LIMIT}"),
        ("max_new_tokens 12.5", "max_new_tokens", f"1 to {LIMIT}"),
        ("do_sample maybe", "do_sample", "true/false, on/off, yes/no or 1/0"),
        ("do_sample 2", "do_sample", "true/false, on/off, yes/no or 1/0"),
        ("temperature", "temperature", "needs a value"),
        ("temperature=", "temperature", "needs a value"),
        # An invalid part makes the whole command invalid, wherever it is.
        ("temperature 0.5 top_k 0", "top_k", "1 to 1000"),
        ("top_k=0 temperature=0.5", "top_k", "1 to 1000"),
    ],
)
def test_invalid_values_name_key_and_range(text, key, range_text):
    with pytest.raises(SettingsError) as info:
        parse(text)
    message = str(info.value)
    assert f"`{key}`" in message
    assert range_text in message
    assert message.endswith("Nothing was changed.")


@pytest.mark.parametrize("text", ["temp 0.5", "seed 3", "temperature 0.5 colour red", "=5"])
def test_unknown_keys_list_the_valid_ones(text):
    with pytest.raises(SettingsError) as info:
        parse(text)
    assert "Unknown setting" in str(info.value)
    assert "temperature, top_k, top_p, max_new_tokens, do_sample" in str(info.value)


def test_repeated_key_is_rejected():
    with pytest.raises(SettingsError, match="more than once"):
        parse("temperature 0.5 temperature 0.6")


@pytest.mark.parametrize("text", ["show all", "reset now", "forget everything"])
def test_words_take_no_arguments(text):
    with pytest.raises(SettingsError, match="takes no arguments"):
        parse(text)


def test_long_garbage_is_shortened_in_the_reply():
    with pytest.raises(SettingsError) as info:
        parse("temperature " + "9" * 500)
    assert len(str(info.value)) < 200
