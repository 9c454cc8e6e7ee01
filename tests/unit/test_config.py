"""Settings: defaults, validation as one line naming the variable, secrets never printed."""

from __future__ import annotations

import pytest

from bot.config import DEFAULT_MODEL, ConfigError, load_settings

SECRET = "xoxb-1234567890-abcdefghijklmnop"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    import os

    for name in list(os.environ):
        if name.startswith(("LLM_", "OPENAI_", "SLACK_", "DISCORD_", "HISTORY_", "REDIS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_follow_the_contract():
    s = load_settings()
    assert s.llm_model == DEFAULT_MODEL
    assert s.llm_device == "auto" and s.llm_dtype == "auto"
    assert s.redis_url is None and str(s.data_dir) == "data"
    assert s.openai_model == "gpt-4o-mini" and s.openai_api_key is None
    assert s.history_scope == "channel" and s.port == 3000 and s.log_format == "text"
    assert s.llm_trust_remote_code is False
    assert s.slack_api_url == "https://slack.com/api/"


def test_env_and_dotenv_are_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("LLM_TEMPERATURE=0.3\nHISTORY_SCOPE=thread\n")
    monkeypatch.setenv("LLM_TOP_K", "7")
    s = load_settings()
    assert s.llm_temperature == 0.3 and s.history_scope == "thread" and s.llm_top_k == 7
    assert s.default_sampling.top_k == 7


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("LLM_DEVICE", "gpu", "auto, cpu, cuda or cuda:N"),
        ("LLM_DTYPE", "int4", "'auto', 'bfloat16', 'float16' or 'float32'"),
        ("LLM_TEMPERATURE", "3", "0 < temperature ≤ 2"),
        ("LLM_TOP_P", "0", "0 < top_p ≤ 1"),
        ("HISTORY_SCOPE", "server", "'channel' or 'thread'"),
        ("LOG_FORMAT", "xml", "'text' or 'json'"),
        ("PORT", "70000", "less than or equal to 65535"),
        ("LLM_DO_SAMPLE", "perhaps", "valid boolean"),
        ("LLM_TOP_K", "0", "a whole number from 1 to 1000"),
        ("OPENAI_BASE_URL", "ftp://x", "http:// or https://"),
        ("HISTORY_MAX_MESSAGES", "1", "greater than or equal to 2"),
        ("SHUTDOWN_GRACE_SECONDS", "0", "greater than 0"),
        ("EVENT_LEASE_SECONDS", "0.5", "greater than or equal to 1"),
        ("EVENT_LEASE_SECONDS", "soon", "valid number"),
    ],
)
def test_invalid_value_is_one_line_naming_the_variable(monkeypatch, name, value, needle):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert name in message
    assert needle in message


def test_max_new_tokens_above_operator_limit():
    with pytest.raises(ConfigError, match="LLM_MAX_NEW_TOKENS_LIMIT"):
        load_settings(llm_max_new_tokens=5000, llm_max_new_tokens_limit=4096)


def test_secrets_are_never_in_repr_or_errors(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    s = load_settings()
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump())
    assert s.slack_bot_token is not None and s.slack_bot_token.get_secret_value() == SECRET
    # A validation error next to a secret does not echo it either.
    monkeypatch.setenv("REDIS_URL", "")
    monkeypatch.setenv("PORT", SECRET)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert SECRET not in str(info.value)


def test_local_model_can_be_disabled(monkeypatch):
    monkeypatch.setenv("LLM_MODEL", "none")
    assert load_settings().local_model_enabled is False


def test_slack_admins_list(monkeypatch):
    monkeypatch.setenv("SLACK_SETTINGS_ADMINS", "U1, U2 U3")
    assert load_settings().slack_admin_ids == frozenset({"U1", "U2", "U3"})
