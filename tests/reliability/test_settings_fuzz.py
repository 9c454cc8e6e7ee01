"""Property-based fuzzing of /llm-settings: the parser alone with thousands of inputs, then the
whole command through SupportService.settings over real Redis.

The inputs are grammar-aware: real keys in any case, near-miss keys, the command words, `=` with
any spacing, values that are valid, out of range, NaN/inf, huge, signed, hex, unicode digits,
repeated keys, control characters and arbitrary unicode. Whatever comes in:
- the parser returns a command or raises SettingsError (whose text is the reply and ends
  "Nothing was changed."), nothing else;
- a change it accepts holds only valid values, and keys that the input named;
- through the service, the stored overrides are either exactly what they were, or exactly the
  previous ones updated with the parsed values, and the audit log grows by one entry only when
  something was recorded (a real change, a reset or a forget).

Runs are deterministic (derandomized, no example database), so CI sees the same inputs each time.
"""

from __future__ import annotations

import math
import re
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from bot.conversation import ConversationKey, Message
from bot.llm.chain import LLMChain
from bot.sampling import (
    KEYS,
    SPECS,
    Change,
    Forget,
    Log,
    Reset,
    SamplingSettings,
    SettingsError,
    SettingValue,
    Show,
    parse_command,
)
from bot.service import SupportService, User
from bot.store import RedisStore, audit_key
from tests.support.backends import ScriptedLLM

LIMIT = 4096
# The numeric and boolean keys; `knowledge` and `collection` (words) appear through KEYS in
# the free-form strategies, and `valid` knows their grammar.
SAMPLING_KEYS = tuple(SPECS)
WORDS = ("show", "reset", "log", "forget")
RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (1, 1000)}

near_keys = st.sampled_from(
    ["temp", "top-k", "topk", "top_k_", "max_tokens", "max-new-tokens", "sample", "seed", "k"]
)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(str.upper),
    st.sampled_from(KEYS).map(str.title),
    near_keys,
    st.sampled_from(WORDS),
)
special_values = st.sampled_from(
    [
        *("true", "false", "on", "off", "yes", "no", "1", "0", "TRUE", "Off", "YES", "y", "t"),
        *("nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e-400", "4.9e-324"),
        *("0", "-0", "+0", "0.0", "-0.0", "2", "2.0", "2.0000000001", "1.0", "1.0000001", ".5"),
        *("5.", "+1", "-1", "1_000", "0x10", "1e3", "1E3", "1000", "1001", "4096", "4097"),
        *("١٢", "٣", "１", "Ⅻ", "²", "½", "0.5.5", "--1", "+-1", "1e", "e3", ".", "-", "+"),
        *("", "=", "==", " ", "\t", "\x00", "\u200b", "\ud800", "é", "🚀", "'0.5'", '"1"'),
    ]
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-3, max_value=3).map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=1, max_value=400).map(lambda n: "9" * n),
    # Lengths around CPython's int() limit (4,300 digits) and float's range (309).
    st.sampled_from([309, 4299, 4300, 4301, 6000]).map(lambda n: "1" * n),
    st.integers(min_value=1, max_value=60).map(lambda n: "0" * n + "5"),
)
values = st.one_of(special_values, numbers, st.text(max_size=6))
separators = st.sampled_from(["=", " = ", "= ", " =", " ", "  ", "\t", "\n", "==", "=\u3000"])
pairs = st.tuples(keys, separators, values).map("".join)
parts = st.one_of(pairs, pairs, pairs, keys, values, st.text(max_size=8))
spaces = st.sampled_from([" ", "  ", "\t", "\n", " \u00a0"])
joiners = st.one_of(spaces, st.just(","))
command_words = st.sampled_from(["", "show", "reset", "log", "forget", "RESET", " show "])


@st.composite
def commands(draw: st.DrawFn) -> str:
    """A /llm-settings argument string: anything at all (1 in 10), a valid change with a part of
    junk put somewhere in it (3 in 10), or parts of the grammar in any order (6 in 10)."""
    choice = draw(_ten)
    if choice == 0:
        return draw(_any_text)
    if choice <= 3:
        text, _ = draw(valid_changes())
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(joiners) + draw(_maybe_part) + draw(joiners) + text[cut:]
    body = draw(joiners).join(draw(_part_lists))
    return draw(_command_prefixes) + body + draw(_endings)


_ten = st.integers(0, 9)
_any_text = st.text(max_size=40)
_maybe_part = st.one_of(st.just(""), parts)
_part_lists = st.lists(parts, max_size=6)
_command_prefixes = st.sampled_from(["", "", "/llm-settings ", "/LLM-SETTINGS", "  "])
_endings = st.sampled_from(["", " ", "\n", "\x00"])


def valid(key: str, value: SettingValue) -> bool:
    if key == "knowledge":
        return value in ("off", "prefer", "strict")
    if key == "collection":
        return (
            isinstance(value, str) and re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", value) is not None
        )
    if key == "do_sample":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if key in ("temperature", "top_p"):
        low, high = RANGES[key]
        return isinstance(value, float) and math.isfinite(value) and low < value <= high
    high = 1000 if key == "top_k" else LIMIT
    return isinstance(value, int) and 1 <= value <= high


def parse(text: str) -> Any:
    """The parser's answer: a command, or the SettingsError it raised. Anything else escapes."""
    try:
        return parse_command(text, max_new_tokens_limit=LIMIT)
    except SettingsError as exc:
        return exc


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(commands())
def test_parser_returns_a_command_or_a_settings_error_and_only_valid_changes(text: str) -> None:
    result = parse(text)
    event(type(result).__name__)
    if isinstance(result, SettingsError):
        assert str(result).endswith("Nothing was changed."), str(result)
        assert "\n" not in str(result)
        return
    assert isinstance(result, Show | Reset | Log | Forget | Change)
    if isinstance(result, Change):
        assert result.values, text
        lowered = text.lower()
        for key, value in result.values.items():
            assert key in KEYS and key in lowered, (text, key)
            assert valid(key, value), (text, key, value)
        SamplingSettings().with_overrides(result.values)  # the effective settings can be built


@st.composite
def valid_changes(draw: st.DrawFn) -> tuple[str, dict[str, SettingValue]]:
    """A valid change in any of the grammar's styles, and the values it must set."""
    wanted = {key: _fit(key, value) for key, value in draw(_change_values).items()}
    words = [
        (key, key.upper(), key.title())[draw(_three)]
        + draw(_assignments)
        + _shown(value, draw(_four))
        for key, value in wanted.items()
    ]
    return draw(_prefixes) + draw(spaces).join(words), wanted


# Built once: building strategies inside a draw is what makes generation slow.
_change_values = st.dictionaries(
    st.sampled_from(SAMPLING_KEYS),
    st.one_of(
        st.floats(min_value=0.01, max_value=1.0),
        st.integers(min_value=1, max_value=1000),
        st.booleans(),
    ),
    min_size=1,
)
_three = st.integers(0, 2)
_four = st.integers(0, 3)
_assignments = st.sampled_from(["=", " = ", " ", "= ", " =", "\t"])
_prefixes = st.sampled_from(["", "/llm-settings ", " "])


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(valid_changes())
def test_every_valid_change_parses_to_exactly_its_values(
    change: tuple[str, dict[str, SettingValue]],
) -> None:
    text, wanted = change
    result = parse(text)
    assert isinstance(result, Change), (text, result)
    assert result.values == wanted


BAD_VALUES = {
    "temperature": ["0", "-0.1", "2.01", "nan", "inf", "hot", "1e309", "", "0x1"],
    "top_p": ["0", "1.5", "-1", "NaN", "-inf", "most", "1,0"],
    "top_k": ["0", "1001", "-5", "1.5", "1e3", "many", "9" * 5000],
    "max_new_tokens": ["0", str(LIMIT + 1), "-1", "2.0", "lots", "1" * 4301],
    "do_sample": ["maybe", "2", "-1", "tru", "y", "nope"],
}


@st.composite
def one_bad_part(draw: st.DrawFn) -> str:
    """Something that must spoil a whole command: a bad value, an unknown key, a repeated key,
    or a key without a value at the end."""
    kind = draw(st.sampled_from(["value", "unknown", "repeat", "dangling"]))
    key = draw(st.sampled_from(SAMPLING_KEYS))
    if kind == "value":
        return key + draw(st.sampled_from(["=", " "])) + draw(st.sampled_from(BAD_VALUES[key]))
    if kind == "unknown":
        return draw(near_keys) + "=" + draw(st.sampled_from(["1", "0.5", "true"]))
    if kind == "repeat":
        return "__repeat__"
    return "__dangling__"


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(st.sampled_from(SAMPLING_KEYS), st.integers(1, 5), min_size=1),
    one_bad_part(),
    st.integers(min_value=0, max_value=5),
)
def test_one_bad_part_spoils_the_whole_command(good: dict[str, int], bad: str, where: int) -> None:
    words = [f"{key}={_shown(_fit(key, seed / 5))}" for key, seed in good.items()]
    if bad == "__repeat__":
        words.append(words[0])
    elif bad == "__dangling__":
        words.append(next(iter(good)))  # a key with nothing after it, at the very end
        where = len(words)
    else:
        words.insert(min(where, len(words)), bad)
    result = parse(" ".join(words))
    assert isinstance(result, SettingsError), (words, result)  # never a partial Change


def _fit(key: str, value: Any) -> SettingValue:
    """Turn any drawn value into a valid one for `key`."""
    if key == "do_sample":
        return bool(value)
    if key in ("temperature", "top_p"):
        return float(min(max(float(value), 0.01), 1.0))
    return int(min(max(int(value), 1), 1000))


def _shown(value: SettingValue, style: int = 0) -> str:
    """`value` as a user might type it: booleans as any of the words, numbers as repr or str."""
    if isinstance(value, bool):
        return [("true", "false"), ("on", "off"), ("yes", "no"), ("1", "0")][style][not value]
    return repr(value) if style % 2 == 0 else f"+{value}"


# -- through the service, with real Redis ---------------------------------------------------------


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            # Changes that are valid often enough for stored state to build up, and words.
            st.one_of(commands(), valid_changes().map(lambda change: change[0]), command_words),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
async def test_through_the_service_a_change_is_all_or_nothing_and_audited_once(
    redis: Redis, script: list[tuple[str, bool, bool]]
) -> None:
    store = RedisStore(redis, defaults=SamplingSettings(), max_new_tokens_limit=LIMIT)
    svc = SupportService(store=store, llm=LLMChain(ScriptedLLM()), persona="p")
    key = ConversationKey("slack", "T1", f"C{await redis.incr('fuzz-channel')}")
    await store.append(key, Message("user", "something to forget"))

    # Each command, and sometimes the same again at once (a repeated change records nothing).
    steps = [(text, admin) for text, admin, twice in script for _ in range(2 if twice else 1)]
    for text, is_admin in steps:
        user = User("U-admin" if is_admin else "U-member", can_configure=is_admin)
        before = (await store.channel_settings(key)).overrides
        audit_before = await redis.llen(audit_key(key))

        reply = await svc.settings(key, user, text)

        after = (await store.channel_settings(key)).overrides
        audit = await store.settings_log(key, limit=1000)
        grown = len(audit) - audit_before
        expected = parse(text)
        event(type(expected).__name__ + ("" if is_admin else " (not an admin)"))
        changing = isinstance(expected, Change | Reset | Forget)
        # No knowledge base here: no collection exists, so any `collection` change is refused.
        no_such_collection = isinstance(expected, Change) and "collection" in expected.values
        if (
            isinstance(expected, SettingsError)
            or (changing and not is_admin)
            or (no_such_collection and is_admin)
        ):
            assert reply.endswith("Nothing was changed."), (text, reply)
            assert after == before and grown == 0, (text, before, after)
        elif isinstance(expected, Show | Log):
            assert after == before and grown == 0, text
            assert not reply.endswith("Nothing was changed.")
        elif isinstance(expected, Change):
            assert after == before | expected.values, (text, before, after)
            assert reply.startswith("Updated: ")
            real = {k: v for k, v in expected.values.items() if before.get(k) != v}
            assert grown == (1 if real else 0), (text, before, expected.values)
            if real:
                assert audit[0].user == "U-admin" and set(audit[0].changes) == set(real)
        elif isinstance(expected, Reset):
            assert after == {} and grown == 1 and audit[0].action == "reset"
        else:
            assert isinstance(expected, Forget)
            assert after == before and grown == 1 and audit[0].action == "forget"
            assert await store.history(key) == []
