"""Every fake secret the suite hands the bot, in one registry, for the whole-suite log scan.

The scan (tests/conftest.py) fails the session when any registered value, or anything shaped like
a Slack token or an OpenAI key, appears in a log record or in the output of a `supportbot`
subprocess. Shared fixtures take their secrets from here; `register()` adds one at import time.
Module-level string constants of test modules whose names say TOKEN, SECRET, KEY or PASSWORD are
registered too when the suite is collected (`harvest()`), so a test that defines its own fake key
is covered without remembering to register it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

# Shaped like the real thing, as the bot's redaction filter knows them (bot/ops/logging.py), plus
# Discord's three dot-separated base64 parts. Anything of these shapes in a log line is a leak,
# whether or not it is registered (e.g. a "wrong" token a test sends on purpose).
TOKEN_SHAPES = re.compile(
    r"\b(?:xox[abposr]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9_-]{16,}"
    r"|[MN][A-Za-z\d]{23,}\.[\w-]{6,}\.[\w-]{27,})"
)

_REGISTRY: dict[str, str] = {}  # value -> a name to show instead of the value


def register(value: str, name: str | None = None) -> str:
    """Add a fake secret to the scan and return it unchanged (`KEY = register("sk-...")`)."""
    if len(value) >= 8:
        _REGISTRY.setdefault(value, name or f"secret #{len(_REGISTRY) + 1}")
    return value


def registered() -> dict[str, str]:
    return dict(_REGISTRY)


def find(text: str) -> list[str]:
    """The names of the registered secrets and token shapes found in `text`."""
    found = [name for value, name in _REGISTRY.items() if value in text]
    found += [f"token-shaped {m.group(0)[:4]}…" for m in TOKEN_SHAPES.finditer(text)]
    return found


def hide(text: str) -> str:
    """`text` with every registered secret and token shape replaced by its name, for reports."""
    for value, name in sorted(_REGISTRY.items(), key=lambda item: -len(item[0])):
        text = text.replace(value, f"<{name}>")
    return TOKEN_SHAPES.sub(lambda m: f"<token-shaped {m.group(0)[:4]}…>", text)


_SECRET_NAME = re.compile(r"(TOKEN|SECRET|KEY|PASSWORD)")
# Values that are names of settings or variables, not secrets (e.g. "SLACK_BOT_TOKEN").
_NOT_A_SECRET = re.compile(r"[A-Z][A-Z0-9_]*")


def harvest(module_names: Iterable[str] | None = None) -> None:
    """Register module-level string constants named like secrets: in the named modules (the
    collected test modules), or without names in every imported module of the `tests` package."""
    if module_names is None:
        module_names = [n for n in sys.modules if n == "tests" or n.startswith("tests.")]
    for module_name in module_names:
        module = sys.modules.get(module_name)
        for attr, value in vars(module).items() if module is not None else ():
            if (
                isinstance(value, str)
                and _SECRET_NAME.search(attr)
                and attr.isupper()
                and len(value) >= 12
                and not _NOT_A_SECRET.fullmatch(value)
            ):
                register(value, f"{module_name.rsplit('.', 1)[-1]}.{attr}")


# The shared fixtures' secrets (tests/fixtures/fake_slack.py takes these).
SLACK_BOT_TOKEN = register("xoxb-test-1111111111-2222222222-abcdefghijklmnop", "SLACK_BOT_TOKEN")
SLACK_APP_TOKEN = register("xapp-1-A0TEST-3333333333-abcdefghijklmnopqrstuvwxyz", "SLACK_APP_TOKEN")
SLACK_SIGNING_SECRET = register("8f742231b10e8888abcd99yyyzzz85a5", "SLACK_SIGNING_SECRET")
# The OpenAI key of the reliability suite's GPT fallback (the fake server checks nothing unless
# told to, so any key works; this one is what the bot is configured with).
OPENAI_API_KEY = register("sk-reliability-0123456789abcdefghij", "OPENAI_API_KEY")
# A Redis password, for tests that put one in REDIS_URL.
REDIS_PASSWORD = register("hunter2-reliability-redis-pw", "REDIS_PASSWORD")
