"""`supportbot chat` as an operator runs it: a subprocess with piped stdin, the embedded Redis
(REDIS_URL unset), and the real openai client against the fake OpenAI server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_root
from tests.fixtures.tiny_exaone import remote_code_marker

FAKE_KEY = "sk-test-0123456789abcdefghijkl"


def run_chat(stdin: str, env: dict[str, str], *args: str, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "bot", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=env["HOME"],
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path: Path, fake_openai) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "OPENAI_", "REDIS"))}
    base.update(
        HOME=str(tmp_path),
        PYTHONPATH=str(repo_root()),
        HF_HUB_OFFLINE="1",
        DATA_DIR=str(tmp_path / "data"),
        LLM_MODEL="none",
        OPENAI_API_KEY=FAKE_KEY,
        OPENAI_BASE_URL=fake_openai.base_url,
        OPENAI_MODEL="gpt-test",
        SYSTEM_PROMPT="You are the test persona.",
    )
    return base


def test_piped_questions_are_answered_on_stdout_with_history(env, fake_openai):
    result = run_chat("hello\n\nsecond question\n", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["echo: hello", "echo: second question"]
    assert FAKE_KEY not in result.stdout + result.stderr
    bodies = [r.body for r in fake_openai.chat_requests]
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "You are the test persona."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "echo: hello"},
        {"role": "user", "content": "second question"},
    ]
    assert bodies[1]["model"] == "gpt-test" and bodies[1]["stream"] is True


def test_history_and_settings_survive_a_restart_in_data_dir(env, fake_openai):
    first = run_chat("/llm-settings temperature 0.3\nremember this\n", env)
    assert first.returncode == 0, first.stderr
    assert "Updated: temperature=0.3" in first.stdout
    second = run_chat("what did I say?\n", env)
    assert second.returncode == 0, second.stderr
    last = fake_openai.chat_requests[-1].body
    assert {"role": "user", "content": "remember this"} in last["messages"]
    assert last["temperature"] == 0.3
    assert (Path(env["DATA_DIR"])).is_dir()


def test_channels_are_separate_conversations(env, fake_openai):
    run_chat("in alpha\n", env, "--channel", "alpha")
    run_chat("in beta\n", env, "--channel", "beta")
    beta = fake_openai.chat_requests[-1].body["messages"]
    assert all(m["content"] != "in alpha" for m in beta)


def test_settings_command_show_and_invalid_input(env):
    result = run_chat("/llm-settings\n/llm-settings top_k 0\n/llm-settings show\n", env)
    assert result.returncode == 0, result.stderr
    assert "Answering: openai:gpt-test" in result.stdout
    assert "top_k = 50 (default) — openai:gpt-test cannot honour it" in result.stdout
    assert "`top_k` must be a whole number from 1 to 1000 (got `0`). Nothing was changed." in (
        result.stdout
    )


def test_no_backend_gives_one_clear_message_not_a_traceback(env):
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    result = run_chat("hello\n", env)
    assert result.returncode == 0
    assert "No model is configured" in result.stdout
    assert "LLM_MODEL" in result.stdout and "OPENAI_API_KEY" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_gpt_error_is_a_message_with_an_id_matching_the_log(env, fake_openai):
    fake_openai.fail(401, times=5)
    result = run_chat("hello\n", env)
    assert result.returncode == 0
    assert "error id: " in result.stdout
    error_id = result.stdout.split("error id: ")[1].split(")")[0]
    assert f"error_id={error_id}" in result.stderr
    assert FAKE_KEY not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_invalid_configuration_is_one_line_naming_the_variable(env):
    env["LLM_DEVICE"] = "gpu"
    result = run_chat("hello\n", env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "supportbot: invalid configuration: LLM_DEVICE: must be auto, cpu, cuda or cuda:N"
    ]
    assert result.stdout == ""


def test_json_logs_go_to_stderr(env):
    env["LOG_FORMAT"] = "json"
    result = run_chat("hello\n", env)
    assert result.stdout.strip() == "echo: hello"
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert any("answered in console:local:terminal" in line["message"] for line in lines)


def test_unusable_data_dir_is_a_clear_message(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env["DATA_DIR"] = str(blocker / "data")
    result = run_chat("hello\n", env)
    assert result.returncode == 1
    assert "DATA_DIR" in result.stderr and "Traceback" not in result.stderr


def test_unloadable_local_model_falls_back_to_gpt(env, tmp_path):
    env["LLM_MODEL"] = str(tmp_path / "no-such-model")
    env["LLM_DEVICE"] = "cpu"
    result = run_chat("hello\n", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "echo: hello"
    assert "no-such-model" in result.stderr  # the log says why the local model is not used


def test_answers_from_a_local_exaone_directory(env, tiny_exaone_dir, fake_openai):
    env["LLM_MODEL"] = str(tiny_exaone_dir)
    env["LLM_DEVICE"] = "cpu"
    env["LLM_MAX_NEW_TOKENS"] = "8"
    env["LLM_DO_SAMPLE"] = "false"
    result = run_chat("hello\n/llm-settings show\n", env)
    assert result.returncode == 0, result.stderr
    answer, rest = result.stdout.split("\n", 1)
    # Random weights say nothing sensible, but it is the local model's text, not GPT's.
    assert answer.strip() and "error id" not in answer, answer
    assert fake_openai.chat_requests == []
    assert f"Answering: local:{tiny_exaone_dir.name}" in rest
    assert not remote_code_marker(tiny_exaone_dir).exists()


@pytest.mark.slow
def test_model_library_logs_use_the_bot_format_and_draw_no_bars(env, tiny_exaone_dir):
    # transformers logs through a stderr handler of its own and draws a "Loading weights" bar:
    # with LOG_FORMAT=json every stderr line must still be one of our JSON records.
    env = {**env, "LLM_MODEL": str(tiny_exaone_dir), "LLM_ENGINE": "simple", "LOG_FORMAT": "json"}
    result = run_chat("hi\n", env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines  # the bot logs its start-up
    for line in lines:
        record = json.loads(line)  # a bar or a foreign handler's line would not parse
        assert {"time", "level", "logger", "message"} <= set(record)
