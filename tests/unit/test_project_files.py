"""The files operators and CI rely on stay in step with the code."""

from __future__ import annotations

import re

from bot.config import Settings
from tests.conftest import repo_root

CONTRACT = {
    "REDIS_URL", "DATA_DIR", "LLM_MODEL", "LLM_DEVICE", "LLM_DTYPE", "LLM_BASE_URL",
    "LLM_TRUST_REMOTE_CODE", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "SYSTEM_PROMPT",
    "LLM_TEMPERATURE", "LLM_TOP_K", "LLM_TOP_P", "LLM_MAX_NEW_TOKENS", "LLM_DO_SAMPLE",
    "HISTORY_MAX_MESSAGES", "HISTORY_TTL_SECONDS", "HISTORY_SCOPE", "SLACK_BOT_TOKEN",
    "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN", "SLACK_API_URL", "SLACK_SETTINGS_ADMINS",
    "DISCORD_TOKEN", "DISCORD_SETTINGS_ROLE", "DISCORD_GUILD_ID", "DISCORD_SHARD_COUNT",
    "DISCORD_SHARD_IDS", "LOG_FORMAT", "PORT",
}  # fmt: skip


def env_example_names() -> set[str]:
    text = (repo_root() / ".env.example").read_text()
    return {m.group(1) for m in re.finditer(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.M)}


def test_env_example_lists_every_contract_variable_and_every_setting():
    names = env_example_names()
    assert names >= CONTRACT
    assert {f.upper() for f in Settings.model_fields} == names


def test_env_example_has_no_secret_values_and_loads():
    text = (repo_root() / ".env.example").read_text()
    for line in text.splitlines():
        if re.match(r"^[A-Z_]*(TOKEN|SECRET|KEY)=", line):
            assert line.endswith("="), line
    assert "너는 쇼핑몰 홈페이지에 올라온 질문에 대답하는 Q&A 챗봇이야." in text
    Settings(_env_file=repo_root() / ".env.example")  # type: ignore[call-arg]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (repo_root() / "README.md").read_text()
    section = readme.split("## Test", 1)[1]
    command = section.split("```sh\n", 1)[1].split("\n```", 1)[0].strip()
    ci = (repo_root() / ".ci" / "run").read_text()
    assert command in ci.splitlines()
    assert ci.index("torch==2.13.0") < ci.index('-e ".[dev]"') < ci.index(command)
