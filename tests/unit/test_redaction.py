"""The redaction filter: no secret setting's value reaches the log, from any logger, in any form."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
from pydantic import SecretStr

from bot.config import Settings
from bot.ops.logging import REDACTED, new_correlation_id, setup_logging

# These tests hand secrets to logging on purpose to see them redacted; the whole-suite secrets
# scan (tests/conftest.py) leaves them out.
pytestmark = pytest.mark.logs_secrets_on_purpose

# A distinct fake value for every secret setting, shaped like the real thing where it has a shape.
SECRETS = {
    "redis_url": "redis://:hunter2-redis-password@redis.internal:6379/0",
    "llm_api_key": "vllm-key-0123456789abcdef",
    "openai_api_key": "sk-proj-abcdefghijklmnopqrstuvwx0123",
    "slack_bot_token": "xoxb-1111111111-2222222222-abcdefabcdefabcdefabcdef",
    "slack_signing_secret": "8f14e45fceea167a5a36dedd4bea2543",
    "slack_app_token": "xapp-1-A0123456-7890-abcdefabcdefabcdef",
    "discord_token": "MTA5ODc2NTQzMjEwOTg3NjU0Mw.GaBcDe.fGhIjKlMnOpQrStUvWxYz012345",
}
LOGGERS = ["", "bot.service", "httpx", "openai._base_client", "slack_bolt.App", "discord.http",
           "redis.asyncio", "aiohttp.access", "transformers"]  # fmt: skip


def test_every_secret_setting_is_covered():
    secret_fields = {
        name for name, field in Settings.model_fields.items()
        if field.annotation in (SecretStr, SecretStr | None)
    }  # fmt: skip
    assert secret_fields == set(SECRETS)


@pytest.fixture
def logged():
    stream = io.StringIO()
    settings = Settings(**{k: SecretStr(v) for k, v in SECRETS.items()})  # type: ignore[arg-type]

    def emit(fmt: str) -> str:
        setup_logging(fmt, settings.secret_values(), level=logging.DEBUG)
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        new_correlation_id()
        for name in LOGGERS:
            log = logging.getLogger(name)
            for value in SECRETS.values():
                log.info("plain %s", value)
                log.warning(f"inline {value} in the message")
                log.debug("in a dict %s", {"headers": {"Authorization": f"Bearer {value}"}})
                try:
                    raise RuntimeError(f"upstream said: invalid token {value}")
                except RuntimeError:
                    log.exception("with a traceback")
        logging.getLogger("redis.asyncio").warning("AUTH hunter2-redis-password failed")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"deprecated use of {SECRETS['openai_api_key']}", stacklevel=1)
        return stream.getvalue()

    yield emit
    logging.getLogger().handlers.clear()
    logging.captureWarnings(False)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_reaches_the_log(logged, fmt):
    output = logged(fmt)
    # The warning and the exception of every logger and secret at least (some libraries' INFO
    # and DEBUG lines are filtered by level, which is fine).
    assert output.count(REDACTED) >= len(SECRETS) * len(LOGGERS) * 2
    for value in SECRETS.values():
        assert value not in output
    assert "hunter2-redis-password" not in output  # the password alone, not only the whole URL
    assert "Traceback" in output  # exceptions are logged, just redacted
    if fmt == "json":
        records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        assert records and all(r["correlation_id"] != "-" for r in records)


def test_token_shapes_are_redacted_even_when_not_configured(logged):
    stream = io.StringIO()
    setup_logging("text", [])
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logging.getLogger("slack_sdk").warning(
        "someone else's token xoxb-9999999999-8888888888-zzzzzzzzzzzzzzzzzzzzzzzz leaked"
    )
    assert "xoxb-9999999999" not in stream.getvalue() and REDACTED in stream.getvalue()
