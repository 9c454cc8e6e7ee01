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
    "KB_EMBED_MODEL", "KB_MODE", "KB_COLLECTION", "KB_TOP_K", "SLACK_HANDOFF_TO",
    "DISCORD_HANDOFF_ROLE",
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


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```sh block under a README heading, comments dropped."""
    section = (repo_root() / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    install = [line for line in readme_block("Install and run") if line.startswith("pip ")]
    (test_command,) = readme_block("Test")
    ci = (repo_root() / ".ci" / "run").read_text().splitlines()
    # Every README line is a line of .ci/run, in the README's order, the test command last.
    positions = [ci.index(line) for line in [*install, test_command]]
    assert positions == sorted(positions)
    assert install == [
        "pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu",
        'pip install -e ".[dev]"',
    ]


def test_readme_says_what_differs_on_a_gpu_host_before_the_install():
    section = (repo_root() / "README.md").read_text().split("## Install and run\n", 1)[1]
    before_install = section.split("```sh", 1)[0]
    assert "without an NVIDIA GPU" in before_install
    assert "on a GPU host leave that first line out" in before_install


def test_the_dev_extra_has_what_the_tests_run():
    import tomllib

    project = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]
    dev = " ".join(project["optional-dependencies"]["dev"])
    for tool in ("pytest", "pytest-asyncio", "ruff", "mypy", "transformers[serving]"):
        assert tool in dev
