"""`supportbot doctor` as an operator runs it: a subprocess, its lines on stdout, its exit status.

All good: the embedded Redis in a temporary DATA_DIR, the tiny EXAONE checkpoint on the CPU, the
real openai client against the fake OpenAI server, slack_sdk against the fake Slack Web API.
Then what an operator gets wrong, each named on its own line, with no secret ever printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.ops.redis_server import free_port
from tests.conftest import repo_root
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
    fake_slack_fixture,  # noqa: F401
)

OPENAI_KEY = "sk-doctor-e2e-0123456789abcdefghij"
REDIS_PASSWORD = "doctor-e2e-redis-password"
PREFIXES = ("LLM_", "OPENAI_", "REDIS", "DISCORD_", "SLACK_", "HISTORY_", "DATA_DIR", "LOG_")


@pytest.fixture
def env(tmp_path: Path, fake_openai: FakeOpenAI, fake_slack: FakeSlack) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    base.update(
        HOME=str(tmp_path),
        PYTHONPATH=str(repo_root()),
        HF_HUB_OFFLINE="1",
        DATA_DIR=str(tmp_path / "data"),
        LLM_MODEL="none",
        LLM_DEVICE="cpu",
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=fake_openai.base_url,
        SLACK_BOT_TOKEN=BOT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=fake_slack.url,
    )
    return base


def run_doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "doctor", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=env["HOME"],
        timeout=120,
    )


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """name -> its whole line (the last one of that name: slack has two names)."""
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        if not line.startswith("doctor: "):
            found[line[6:].split(":", 1)[0]] = line
    return found


def assert_no_secret(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in (OPENAI_KEY, BOT_TOKEN, SIGNING_SECRET, *secrets):
        assert secret not in result.stdout + result.stderr


def test_everything_configured_works(env: dict[str, str], tiny_exaone_dir: Path) -> None:
    env["LLM_MODEL"] = str(tiny_exaone_dir)
    result = run_doctor(env)
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result)
    assert list(found) == [
        "config", "redis", "gpu", "model", "openai", "backend", "slack", "slack-mode", "discord",
    ]  # fmt: skip
    assert found["config"] == "ok    config: valid (environment; no .env in this directory)"
    assert found["redis"].startswith("ok    redis: embedded redis-server ")
    assert found["gpu"] == "skip  gpu: not used: LLM_DEVICE=cpu"
    assert found["model"].startswith(f"ok    model: {tiny_exaone_dir} on cpu as float32, ")
    assert found["openai"].startswith("ok    openai: key accepted; ")
    assert found["backend"] == (
        "ok    backend: answers with the local model, then openai:gpt-4o-mini"
    )
    assert found["slack"] == (
        "ok    slack: auth.test: SLACK_BOT_TOKEN is @supportbot (U0BOT) in Fake (T0TEST)"
    )
    assert found["slack-mode"].startswith("ok    slack-mode: HTTP mode: ")
    assert found["discord"] == "skip  discord: DISCORD_TOKEN not set"
    assert result.stdout.splitlines()[-1] == "doctor: 7 ok, 0 warn, 2 skip, 0 FAIL; exit 0"
    assert_no_secret(result)


def test_an_invalid_setting_is_one_line_and_exit_2(env: dict[str, str]) -> None:
    env["LLM_DEVICE"] = "gpu"
    result = run_doctor(env)
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        "FAIL  config: invalid configuration: LLM_DEVICE: must be auto, cpu, cuda or cuda:N"
    ]
    assert result.stderr == ""


def test_each_misconfiguration_is_named_on_its_line(
    env: dict[str, str], fake_openai: FakeOpenAI
) -> None:
    fake_openai.required_api_key = "sk-the-right-key-0123456789"
    env.update(
        REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
        LLM_MODEL="/nonexistent/model",
    )
    del env["SLACK_SIGNING_SECRET"]
    result = run_doctor(env)
    assert result.returncode == 1
    found = lines(result)
    assert found["redis"].startswith("FAIL  redis: cannot use redis://:****@127.0.0.1:")
    assert found["model"] == "FAIL  model: LLM_MODEL=/nonexistent/model: no such directory"
    assert found["openai"] == "FAIL  openai: OPENAI_API_KEY rejected (HTTP 401)"
    assert found["backend"].startswith("FAIL  backend: no backend can answer")
    assert found["slack"].startswith("ok    slack: ")
    assert found["slack-mode"].startswith("FAIL  slack-mode: SLACK_SIGNING_SECRET is not set")
    assert_no_secret(result, REDIS_PASSWORD)
    assert "Traceback" not in result.stdout + result.stderr
