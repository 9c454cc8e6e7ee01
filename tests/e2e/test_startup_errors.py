"""A Redis that cannot be used stops `supportbot chat` with one line naming REDIS_URL: exit 2 when
the URL is invalid as written or its password or database index is wrong, exit 1 when nothing
answers. No traceback and never the password (a real `python -m bot chat` subprocess; real
redis-servers, one of them with a password)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.ops.redis_server import find_redis_server, free_port
from tests.conftest import repo_root

PASSWORD = "s3cret-redis-pass-4242"


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[int]:
    """A redis-server that requires PASSWORD, on a free port."""
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.02)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def run_chat(
    tmp_path: Path, redis_url: str, command: tuple[str, ...] = ("chat",)
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "OPENAI_", "REDIS"))}
    env.update(
        HOME=str(tmp_path),
        PYTHONPATH=str(repo_root()),
        HF_HUB_OFFLINE="1",
        DATA_DIR=str(tmp_path / "data"),
        LLM_MODEL="none",
        REDIS_URL=redis_url,
    )
    return subprocess.run(
        [sys.executable, "-m", "bot", *command],
        input="hello\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )


CASES = {
    # name: (REDIS_URL, with {port} the locked server's and {free} a port nobody listens on;
    #        exit code; words of the one line)
    "not a URL": ("localhost:6379", 2, "not a Redis URL"),
    "another scheme": (f"http://:{PASSWORD}@localhost/", 2, "not a Redis URL"),
    "port out of range": (f"redis://:{PASSWORD}@127.0.0.1:99999/0", 2, "invalid port"),
    "port not a number": (f"redis://:{PASSWORD}@127.0.0.1:six/0", 2, "invalid port"),
    "database not a number": (f"redis://:{PASSWORD}@127.0.0.1:{{port}}/x", 2, "database index"),
    "database out of range": (f"redis://:{PASSWORD}@127.0.0.1:{{port}}/999", 2, "no database"),
    "wrong password": ("redis://:wrong-pass-9999@127.0.0.1:{port}/0", 2, "refused the cred"),
    "no password": ("redis://127.0.0.1:{port}/0", 2, "refused the credentials"),
    "nothing listening": (f"redis://:{PASSWORD}@127.0.0.1:{{free}}/0", 1, "cannot reach Redis"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unusable_redis_url_is_one_line_naming_it(
    case: str, locked_redis: int, tmp_path: Path
) -> None:
    template, code, words = CASES[case]
    result = run_chat(tmp_path, template.format(port=locked_redis, free=free_port()))
    assert result.returncode == code, result.stderr
    assert result.stdout == ""  # no answer, no question taken
    (line,) = result.stderr.splitlines()
    assert line.startswith("supportbot: ") and "REDIS_URL" in line and words in line, line
    assert "Traceback" not in result.stderr
    assert PASSWORD not in line and "wrong-pass-9999" not in line
    assert not (tmp_path / "data").exists()  # nothing was started or written


def test_the_right_password_and_database_answer(locked_redis: int, tmp_path: Path) -> None:
    result = run_chat(tmp_path, f"redis://:{PASSWORD}@127.0.0.1:{locked_redis}/3")
    assert result.returncode == 0, result.stderr
    assert "No model is configured" in result.stdout  # it got as far as answering


@pytest.mark.parametrize("case", ["not a URL", "wrong password", "nothing listening"])
def test_kb_says_the_same_one_line_for_an_unusable_redis_url(
    case: str, locked_redis: int, tmp_path: Path
) -> None:
    template, code, words = CASES[case]
    url = template.format(port=locked_redis, free=free_port())
    result = run_chat(tmp_path, url, ("kb", "list"))
    assert result.returncode == code, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("supportbot: ") and "REDIS_URL" in line and words in line, line
    assert "Traceback" not in result.stderr
