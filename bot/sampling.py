"""Per-channel sampling settings: the table of keys, the values, and the /llm-settings grammar.

Pure: no Redis, no model. Grammar (../shared/DESIGN.md):
    /llm-settings | show | reset | log | forget
    /llm-settings temperature 0.8
    /llm-settings temperature=0.7 top_p=0.9 top_k=50
Every part is validated before anything is stored: one invalid part changes nothing.

`SPECS` is the one table of the sampling keys (type, range, default, the words for the range):
Settings, the parser, Discord's autocomplete and the engines all read it.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

SettingValue = float | int | bool | str
Kind = Literal["float", "int", "bool"]


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One sampling key. Numbers are valid in (low, high] for floats and [low, high] for ints;
    `high=None` means the operator's maximum (LLM_MAX_NEW_TOKENS_LIMIT)."""

    name: str
    kind: Kind
    default: SettingValue
    low: float = 0
    high: float | None = None
    words: str = ""  # the valid range in words; `{high}` is filled in

    def valid_range(self, limit: int) -> str:
        return self.words.format(high=self.upper(limit))

    def upper(self, limit: int) -> float:
        return limit if self.high is None else self.high

    def accepts(self, value: SettingValue, limit: int) -> bool:
        """Whether a value of the right type is in range."""
        if self.kind == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.kind == "int":
            return isinstance(value, int) and self.low <= value <= self.upper(limit)
        number = float(value)
        return math.isfinite(number) and self.low < number <= self.upper(limit)


SPECS: dict[str, KeySpec] = {
    spec.name: spec
    for spec in (
        KeySpec("temperature", "float", 0.7, 0, 2, "a number with 0 < temperature ≤ 2"),
        KeySpec("top_k", "int", 50, 1, 1000, "a whole number from 1 to 1000"),
        KeySpec("top_p", "float", 0.95, 0, 1, "a number with 0 < top_p ≤ 1"),
        KeySpec("max_new_tokens", "int", 512, 1, None, "a whole number from 1 to {high}"),
        KeySpec("do_sample", "bool", True, words="true/false, on/off, yes/no or 1/0"),
    )
}
# The channel's knowledge settings: not sampling values (no model sees them) but /llm-settings
# keys like the others, stored beside them.
KnowledgeMode = Literal["off", "prefer", "strict"]
KNOWLEDGE_MODES: tuple[KnowledgeMode, ...] = ("off", "prefer", "strict")
_KNOWLEDGE_WORDS = {
    "knowledge": "off, prefer or strict",
    "collection": "the name of a collection in the knowledge base (see `supportbot kb list`)",
}
KEYS: tuple[str, ...] = (*SPECS, *_KNOWLEDGE_WORDS)
COMMAND = "/llm-settings"
_COLLECTION = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_collection(name: str) -> str:
    """A collection name, or ValueError saying what one is."""
    if not _COLLECTION.fullmatch(name):
        raise ValueError(
            "must be 1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class KnowledgeChoice:
    """Whether and where a channel's questions look in the knowledge base (KB_MODE,
    KB_COLLECTION, and the channel's `knowledge` / `collection`)."""

    mode: KnowledgeMode = "prefer"
    collection: str = "default"

    def with_overrides(self, overrides: Mapping[str, SettingValue]) -> KnowledgeChoice:
        mode = overrides.get("knowledge", self.mode)
        collection = overrides.get("collection", self.collection)
        return KnowledgeChoice(mode if mode in KNOWLEDGE_MODES else self.mode, str(collection))


# Below this temperature, sampling is decoded greedily: greedy is the limit of sampling as the
# temperature goes to 0, and dividing logits by a smaller number can overflow to inf/NaN in the
# model's float32 (1e-320 is even 0.0 there). `/llm-settings show` says so.
GREEDY_BELOW_TEMPERATURE = 1e-3


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """Sampling as transformers' text-generation pipeline takes it; defaults from SPECS.

    transformers applies temperature first, then top-k, then top-p; with do_sample=False decoding
    is greedy and the other three are ignored.
    """

    temperature: float = float(SPECS["temperature"].default)
    top_k: int = int(SPECS["top_k"].default)
    top_p: float = float(SPECS["top_p"].default)
    max_new_tokens: int = int(SPECS["max_new_tokens"].default)
    do_sample: bool = bool(SPECS["do_sample"].default)

    def with_overrides(self, overrides: Mapping[str, SettingValue]) -> SamplingSettings:
        sampling = {k: v for k, v in overrides.items() if k in SPECS}
        return replace(self, **sampling)  # type: ignore[arg-type]

    @property
    def greedy(self) -> bool:
        """Whether engines decode greedily: do_sample off, or a temperature below the floor."""
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE


_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INT = re.compile(r"[+-]?\d+")
_MAX_INT_CHARS = 100
_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


class SettingsError(ValueError):
    """Invalid /llm-settings input; str() is the reply, which always ends 'Nothing was changed.'"""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem} Nothing was changed.")


def valid_range(key: str, max_new_tokens_limit: int) -> str:
    if key in _KNOWLEDGE_WORDS:
        return _KNOWLEDGE_WORDS[key]
    return SPECS[key].valid_range(max_new_tokens_limit)


def parse_value(key: str, raw: str, max_new_tokens_limit: int) -> SettingValue:
    """One value, checked against the table; raises SettingsError naming the range."""
    text = raw.strip()
    if key in _KNOWLEDGE_WORDS:
        return _parse_knowledge(key, text)
    spec = SPECS[key]
    value: SettingValue | None = None
    if spec.kind == "float":
        if _FLOAT.fullmatch(text):
            value = float(text)
    elif spec.kind == "int":
        # A number this long is out of range (or zero-padded past reason); and past 4,300
        # digits int() raises ValueError instead of converting (CPython's guard).
        if _INT.fullmatch(text) and len(text) <= _MAX_INT_CHARS:
            value = int(text)
    else:
        word = text.lower()
        if word in _TRUE or word in _FALSE:
            value = word in _TRUE
    if value is None or not spec.accepts(value, max_new_tokens_limit):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise SettingsError(
            f"`{key}` must be {valid_range(key, max_new_tokens_limit)} (got `{shown}`)."
        )
    return value


def _parse_knowledge(key: str, text: str) -> str:
    word = text.lower()
    if key == "knowledge" and word in KNOWLEDGE_MODES:
        return word
    if key == "collection":
        with contextlib.suppress(ValueError):
            return check_collection(word)
    shown = text if len(text) <= 40 else text[:37] + "..."
    raise SettingsError(f"`{key}` must be {_KNOWLEDGE_WORDS[key]} (got `{shown}`).")


@dataclass(frozen=True, slots=True)
class Show:
    pass


@dataclass(frozen=True, slots=True)
class Reset:
    pass


@dataclass(frozen=True, slots=True)
class Log:
    pass


@dataclass(frozen=True, slots=True)
class Forget:
    pass


@dataclass(frozen=True, slots=True)
class Change:
    values: dict[str, SettingValue]


SettingsCommand = Show | Reset | Log | Forget | Change
_WORDS: dict[str, SettingsCommand] = {
    "show": Show(),
    "reset": Reset(),
    "log": Log(),
    "forget": Forget(),
}


def parse_command(text: str, *, max_new_tokens_limit: int) -> SettingsCommand:
    """Parse the arguments of /llm-settings (the command word itself may be included)."""
    text = text.strip()
    if text.lower().startswith(COMMAND):
        text = text[len(COMMAND) :]
    # `key = value`, `key= value` and `key =value` all mean `key=value`.
    tokens = re.sub(r"\s*=\s*", "=", text.strip()).split()
    if not tokens:
        return Show()
    if len(tokens) == 1 and tokens[0].lower() in _WORDS:
        return _WORDS[tokens[0].lower()]
    if tokens[0].lower() in _WORDS:
        raise SettingsError(f"`{tokens[0].lower()}` takes no arguments.")

    values: dict[str, SettingValue] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if "=" in token:
            key, _, raw = token.partition("=")
            i += 1
        else:
            key = token
            if i + 1 >= len(tokens):
                raise SettingsError(_missing_value(key.lower(), max_new_tokens_limit))
            raw = tokens[i + 1]
            i += 2
        key = key.lower()
        if key not in KEYS:
            shown = key if len(key) <= 40 else key[:37] + "..."
            raise SettingsError(
                f"Unknown setting `{shown}`. Settings are: {', '.join(KEYS)}; "
                "or use show, reset, log, forget."
            )
        if not raw:
            raise SettingsError(_missing_value(key, max_new_tokens_limit))
        if key in values:
            raise SettingsError(f"`{key}` is given more than once.")
        values[key] = parse_value(key, raw, max_new_tokens_limit)
    return Change(values)


def _missing_value(key: str, limit: int) -> str:
    if key in KEYS:
        return f"`{key}` needs a value: {valid_range(key, limit)}."
    return f"Unknown setting `{key[:40]}`. Settings are: {', '.join(KEYS)}."


def format_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    effective: SamplingSettings
    overrides: dict[str, SettingValue]  # only the keys the channel set
    knowledge: KnowledgeChoice = KnowledgeChoice()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    user: str
    action: Literal["set", "reset", "forget"]
    changes: Mapping[str, tuple[str | None, str | None]]  # key -> (old, new); None = default
    at: float  # unix time

    def encode(self) -> str:
        return json.dumps(
            {"user": self.user, "action": self.action, "changes": self.changes, "at": self.at},
            ensure_ascii=False,
        )

    @staticmethod
    def decode(raw: bytes | str) -> AuditEntry:
        data = json.loads(raw)
        changes = {k: (v[0], v[1]) for k, v in data["changes"].items()}
        return AuditEntry(str(data["user"]), data["action"], changes, float(data["at"]))
