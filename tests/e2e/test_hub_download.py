"""A model hub that accepts connections and never answers: `supportbot chat` must not hang.

HF_ENDPOINT points huggingface_hub at a socket on 127.0.0.1 that accepts every connection and
sends nothing. The bot must give up on the hub within HF_HUB_DOWNLOAD_TIMEOUT, say so on one
line with what to do, and answer with GPT when a key is set.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.test_chat_cli import env, run_chat  # noqa: F401 - the fixture, reused

HUB_MODEL = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A TCP server that accepts connections, reads nothing back, and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)  # kept open, never answered

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def hub_env(env: dict[str, str], endpoint: str, tmp_path) -> dict[str, str]:  # noqa: F811
    env = {k: v for k, v in env.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), LLM_MODEL=HUB_MODEL)
    env["LLM_DEVICE"] = "cpu"
    return env


def test_silent_hub_costs_one_timeout_then_gpt_answers(env, silent_hub, tmp_path):  # noqa: F811
    env = hub_env(env, silent_hub, tmp_path)  # the default HF_HUB_DOWNLOAD_TIMEOUT: 10 s
    began = time.monotonic()
    result = run_chat("hello\n", env, timeout=60)
    elapsed = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "echo: hello"
    assert elapsed < 30, elapsed
    reason = (
        f"local model '{HUB_MODEL}' could not be downloaded: the hub at {silent_hub} did not "
        "answer within 10s (HF_HUB_DOWNLOAD_TIMEOUT); point LLM_MODEL at a checkpoint directory"
    )
    lines = [line for line in result.stderr.splitlines() if reason in line]
    assert len(lines) == 1, result.stderr  # said once, on one line
    assert "Traceback" not in result.stderr


def test_silent_hub_without_gpt_says_what_to_do(env, silent_hub, tmp_path):  # noqa: F811
    env = hub_env(env, silent_hub, tmp_path)
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    env["HF_HUB_DOWNLOAD_TIMEOUT"] = "1"
    began = time.monotonic()
    result = run_chat("hello\n", env, timeout=60)
    assert time.monotonic() - began < 20
    assert result.returncode == 0, result.stderr
    reply = result.stdout.strip()
    assert "\n" not in reply, reply
    assert "did not answer within 1s" in reply
    assert "point LLM_MODEL at a checkpoint directory, or set OPENAI_API_KEY" in reply
    assert "Traceback" not in result.stdout + result.stderr


def test_doctor_fails_when_no_backend_can_answer_now(env, silent_hub, tmp_path):  # noqa: F811
    """Model neither cached nor downloadable, no GPT key: exit 1, with the bot's own reason."""
    import subprocess
    import sys

    env = hub_env(env, silent_hub, tmp_path)
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    env["HF_HUB_DOWNLOAD_TIMEOUT"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "bot", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        cwd=env["HOME"],
        timeout=60,
    )
    assert result.returncode == 1, result.stdout
    model = next(line for line in result.stdout.splitlines() if line[6:].startswith("model:"))
    assert model.startswith("FAIL")
    assert "did not answer within 1s (HF_HUB_DOWNLOAD_TIMEOUT); point LLM_MODEL at" in model
    backend = next(line for line in result.stdout.splitlines() if line[6:].startswith("backend:"))
    assert backend.startswith("FAIL")
