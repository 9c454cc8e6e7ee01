"""`supportbot kb` as an operator runs it (subprocesses, the embedded Redis, the offline MiniLM
embedder), and `supportbot chat` answering from what it added, with its source, through the real
openai client against the fake OpenAI server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import repo_root
from tests.support.knowledge import minilm_path, write_docs


def run(env, *args: str, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], input=stdin, capture_output=True, text=True,
        env=env, cwd=env["HOME"], timeout=180,
    )  # fmt: skip


@pytest.fixture
def env(tmp_path: Path, fake_openai) -> dict[str, str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "OPENAI_", "REDIS", "KB_"))
    }
    base.update(
        HOME=str(tmp_path), PYTHONPATH=str(repo_root()), HF_HUB_OFFLINE="1",
        DATA_DIR=str(tmp_path / "data"), LLM_MODEL="none", OPENAI_API_KEY="sk-test-kb-0123456789",
        OPENAI_BASE_URL=fake_openai.base_url, OPENAI_MODEL="gpt-test",
        SYSTEM_PROMPT="You are the test persona.", KB_EMBED_MODEL=minilm_path(),
    )  # fmt: skip
    return base


def test_kb_add_then_chat_answers_from_the_document_with_its_source(env, tmp_path, fake_openai):
    docs = write_docs(tmp_path / "docs")
    added = run(env, "kb", "add", str(docs))
    assert added.returncode == 0, added.stderr
    lines = added.stdout.splitlines()
    assert lines[-1] == "3 added"
    assert any(line.endswith("returns.md: added (2 passages)") for line in lines), lines

    again = run(env, "kb", "add", str(docs), str(tmp_path / "missing.md"))
    assert again.returncode == 1
    assert again.stdout.splitlines()[-2:] == [f"{tmp_path / 'missing.md'}: failed: no such file",
                                              "3 unchanged, 1 failed"]  # fmt: skip

    found = run(env, "kb", "search", "How", "do", "I", "return", "an", "item?")
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(
        "[1] Returns and refunds › How to return an item — https://shop.example/help/returns ("
    )

    chat = run(env, "chat", stdin="How do I return an item?\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.splitlines()[-2:] == [
        "Sources:",
        "[1] Returns and refunds — https://shop.example/help/returns",
    ]
    system = fake_openai.chat_requests[-1].body["messages"][0]["content"]
    assert system.startswith("You are the test persona.")
    assert "You can return any item within 30 days" in system

    listed = run(env, "kb", "list")
    assert "Returns and refunds — https://shop.example/help/returns: 2 passages" in listed.stdout
    removed = run(env, "kb", "remove", str(docs / "returns.md"))
    assert removed.returncode == 0 and removed.stdout.splitlines()[-1] == "1 removed"
    assert "Returns and refunds" not in run(env, "kb", "list").stdout


def test_kb_rejects_a_bad_collection_name_and_an_unloadable_model(env, tmp_path):
    bad = run(env, "kb", "list", "--collection", "Bad Name")
    assert bad.returncode == 2 and "--collection must be 1 to 64 of a-z" in bad.stderr
    env["KB_EMBED_MODEL"] = str(tmp_path / "no-such-model")
    failed = run(env, "kb", "add", str(write_docs(tmp_path / "docs")))
    assert failed.returncode == 1
    assert "cannot load KB_EMBED_MODEL" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_the_embedding_model_logs_in_the_bot_format_and_draws_no_bars(env, tmp_path):
    # sentence-transformers loads through transformers, which would log through a handler of its
    # own and draw a "Loading weights" bar into the bot's stderr.
    assert run(env, "kb", "add", str(write_docs(tmp_path / "docs"))).returncode == 0
    chat = run({**env, "LOG_FORMAT": "json"}, "chat", stdin="How do I return an item?\n")
    assert chat.returncode == 0, chat.stderr
    lines = [line for line in chat.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert any("embedding model" in json.loads(line)["message"] for line in lines)
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(json.loads(line)), line
