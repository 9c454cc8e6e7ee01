"""`supportbot discord` as an operator starts it, up to the point that needs the real Discord:
the refusals that must come before any connection, as one line on stderr and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_root

TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.discord-e2e-secret"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_", "OPENAI_", "REDIS", "DISCORD_", "SLACK_"))
    }
    base.update(
        HOME=str(tmp_path),
        PYTHONPATH=str(repo_root()),
        HF_HUB_OFFLINE="1",
        DATA_DIR=str(tmp_path / "data"),
        LLM_MODEL="none",
    )
    return base


def run_discord(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "discord"],
        capture_output=True,
        text=True,
        env=env,
        cwd=env["HOME"],
        timeout=120,
    )


def test_without_a_token_it_refuses_with_one_line_naming_discord_token(
    env: dict[str, str],
) -> None:
    result = run_discord(env)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "DISCORD_TOKEN" in line


def test_inconsistent_sharding_is_refused_without_printing_the_token(env: dict[str, str]) -> None:
    env.update(DISCORD_TOKEN=TOKEN, DISCORD_SHARD_COUNT="2", DISCORD_SHARD_IDS="0,2")
    result = run_discord(env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "DISCORD_SHARD_IDS" in line
    assert TOKEN not in result.stdout + result.stderr
