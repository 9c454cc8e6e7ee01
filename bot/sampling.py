"""Per-channel sampling settings: the values, the /llm-settings grammar and their Redis store.

Grammar (../shared/DESIGN.md):
    /llm-settings | show | reset | log | forget
    /llm-settings temperature 0.8
    /llm-settings temperature=0.7 top_p=0.9 top_k=50
Every part is validated before anything is stored: one invalid part changes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

logger = logging.getLogger(__name__)

SettingValue = float | int | bool


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """Sampling as transformers' text-generation pipeline takes it.

    transformers applies temperature first, then top-k, then top-p; with do_sample=False decoding
    is greedy and the other three are ignored.
    """

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 512
    do_sample: bool = True

    def with_overrides(self, overrides: Mapping[str, SettingValue]) -> SamplingSettings:
        return replace(self, **overrides)  # type: ignore[arg-type]


KEYS: tuple[str, ...] = tuple(f.name for f in fields(SamplingSettings))
COMMAND = "/llm-settings"

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
    return {
        "temperature": "a number with 0 < temperature ≤ 2",
        "top_k": "a whole number from 1 to 1000",
        "top_p": "a number with 0 < top_p ≤ 1",
        "max_new_tokens": f"a whole number from 1 to {max_new_tokens_limit}",
        "do_sample": "true/false, on/off, yes/no or 1/0",
    }[key]


def parse_value(key: str, raw: str, max_new_tokens_limit: int) -> SettingValue:
    """One value, checked against the contract's table; raises SettingsError naming the range."""
    text = raw.strip()
    value: SettingValue | None = None
    if key in ("temperature", "top_p"):
        if _FLOAT.fullmatch(text):
            number = float(text)
            upper = 2.0 if key == "temperature" else 1.0
            if math.isfinite(number) and 0 < number <= upper:
                value = number
    elif key in ("top_k", "max_new_tokens"):
        # A number this long is out of range (or zero-padded past reason); and past 4,300
        # digits int() raises ValueError instead of converting (CPython's guard).
        if _INT.fullmatch(text) and len(text) <= _MAX_INT_CHARS:
            whole = int(text)
            upper = 1000 if key == "top_k" else max_new_tokens_limit
            if 1 <= whole <= upper:
                value = whole
    elif key == "do_sample":
        word = text.lower()
        if word in _TRUE or word in _FALSE:
            value = word in _TRUE
    else:  # pragma: no cover - callers pass known keys only
        raise KeyError(key)
    if value is None:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise SettingsError(
            f"`{key}` must be {valid_range(key, max_new_tokens_limit)} (got `{shown}`)."
        )
    return value


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


# -- storage ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    effective: SamplingSettings
    overrides: dict[str, SettingValue]  # only the keys the channel set


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


class SettingsStore:
    """Channel overrides in a Redis hash (no expiry: they survive restarts and silence) and an
    audit list of changes. Keys share the channel's hash tag with its history."""

    AUDIT_KEEP = 200

    def __init__(
        self, redis: Redis, *, defaults: SamplingSettings, max_new_tokens_limit: int
    ) -> None:
        self._redis = redis
        self.defaults = defaults
        self.max_new_tokens_limit = max_new_tokens_limit

    @staticmethod
    def settings_key(channel_tag: str) -> str:
        return f"sb:{channel_tag}:settings"

    @staticmethod
    def audit_key(channel_tag: str) -> str:
        return f"sb:{channel_tag}:settings:log"

    async def get(self, channel_tag: str) -> ChannelSettings:
        raw = await self._redis.hgetall(self.settings_key(channel_tag))
        return self.from_raw(raw)

    def queue_get(self, pipe: Pipeline, channel_tag: str) -> None:
        """Queue the read of `get()` on a caller's pipeline; decode its result with from_raw."""
        pipe.hgetall(self.settings_key(channel_tag))

    def from_raw(self, raw: Mapping[bytes | str, bytes | str]) -> ChannelSettings:
        overrides = self._decode(raw)
        return ChannelSettings(self.defaults.with_overrides(overrides), overrides)

    async def change(
        self, channel_tag: str, user: str, values: Mapping[str, SettingValue]
    ) -> ChannelSettings:
        """Store all of `values` at once, with an audit entry of old → new."""
        key = self.settings_key(channel_tag)

        async def apply(pipe: Pipeline) -> None:
            old = self._decode(await pipe.hgetall(key))
            changes = {
                k: (_shown(old.get(k)), format_value(v))
                for k, v in values.items()
                if old.get(k) != v
            }
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.hset(key, mapping={k: format_value(v) for k, v in values.items()})
            if changes:
                self._audit(pipe, channel_tag, AuditEntry(user, "set", changes, time.time()))

        await self._redis.transaction(apply, key)
        return await self.get(channel_tag)

    async def reset(self, channel_tag: str, user: str) -> ChannelSettings:
        key = self.settings_key(channel_tag)

        async def apply(pipe: Pipeline) -> None:
            old = self._decode(await pipe.hgetall(key))
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.delete(key)
            changes = {k: (format_value(v), None) for k, v in old.items()}
            self._audit(pipe, channel_tag, AuditEntry(user, "reset", changes, time.time()))

        await self._redis.transaction(apply, key)
        return ChannelSettings(self.defaults, {})

    async def record(self, channel_tag: str, entry: AuditEntry) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._audit(pipe, channel_tag, entry)
            await pipe.execute()

    async def log(self, channel_tag: str, limit: int = 20) -> list[AuditEntry]:
        raw = await self._redis.lrange(self.audit_key(channel_tag), 0, limit - 1)
        return [AuditEntry.decode(item) for item in raw]

    def _audit(self, pipe: Pipeline, channel_tag: str, entry: AuditEntry) -> None:
        name = self.audit_key(channel_tag)
        pipe.lpush(name, entry.encode())
        pipe.ltrim(name, 0, self.AUDIT_KEEP - 1)

    def _decode(self, raw: Mapping[bytes | str, bytes | str]) -> dict[str, SettingValue]:
        overrides: dict[str, SettingValue] = {}
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else k
            text = v.decode() if isinstance(v, bytes) else v
            if key not in KEYS:
                continue
            try:
                overrides[key] = parse_value(key, text, self.max_new_tokens_limit)
            except SettingsError:
                # E.g. the operator lowered LLM_MAX_NEW_TOKENS_LIMIT below a stored value.
                logger.warning("ignoring stored %s=%r for %s: out of range now", key, text, k)
        return overrides


def _shown(value: SettingValue | None) -> str | None:
    return None if value is None else format_value(value)
