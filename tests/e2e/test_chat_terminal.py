"""`supportbot chat` in a terminal: signals clean up the embedded Redis, replies are plain text,
and the command line is friendly (`--version`, `chat --help`, a closed pipe)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bot.platforms.console import plain
from tests.e2e.test_chat_cli import env, run_chat  # noqa: F401 - the fixture, reused


def redis_children(pid: int) -> list[int]:
    """Pids of the live redis-server processes started by `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive_redis(int(entry.name), parent=pid):
            found.append(int(entry.name))
    return found


def _alive_redis(pid: int, parent: int | None = None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return "redis" in name and state != "Z" and (parent is None or int(ppid) == parent)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_stops_the_embedded_redis_and_removes_its_socket_dir(
    env,  # noqa: F811
    tmp_path: Path,
    signum: int,
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)  # where the embedded server's socket directory goes
    chat = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat"],
        stdin=subprocess.PIPE,  # left open: the bot waits at its prompt
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=env["HOME"],
    )
    lines: list[str] = []
    ready = threading.Event()

    def read_stderr() -> None:
        assert chat.stderr is not None
        for line in chat.stderr:
            lines.append(line)
            if "backend ready" in line:
                ready.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert ready.wait(30), "".join(lines)
        time.sleep(0.3)  # at the prompt, waiting for a line
        servers = redis_children(chat.pid)
        assert servers, "the embedded redis-server should be running"
        assert any(tmp.iterdir())
        began = time.monotonic()
        chat.send_signal(signum)
        code = chat.wait(10)
        assert time.monotonic() - began < 5  # at once, not after a line that never comes
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()
        reader.join(5)
    assert code == (130 if signum == signal.SIGINT else 128 + signum)
    assert not any(_alive_redis(pid) for pid in servers)
    assert list(tmp.iterdir()) == []
    assert "Traceback" not in "".join(lines)


def test_replies_are_plain_text_with_no_blank_first_line(env) -> None:  # noqa: F811
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    result = run_chat("hello\n/llm-settings show\n", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("No model is")  # the error reply, on the first line
    assert "*" not in result.stdout and "•" not in result.stdout
    assert "LLM settings for this channel" in result.stdout
    assert "- temperature = 0.7 (default)" in result.stdout


def test_plain_rendering_of_slack_markup() -> None:
    assert plain("*Recent changes* (newest first)\n• top_k: 50 → 40") == (
        "Recent changes (newest first)\n- top_k: 50 → 40"
    )
    assert plain("see <https://example.com/a|the docs> or <https://example.com/b>") == (
        "see the docs (https://example.com/a) or https://example.com/b"
    )
    assert plain("2 * 3 * 4 and a*b*c stay") == "2 * 3 * 4 and a*b*c stay"


def cli(*args: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def test_version(env) -> None:  # noqa: F811
    from importlib.metadata import version

    result = cli("--version", environ=env)
    assert result.returncode == 0
    assert result.stdout.strip() == f"supportbot {version('supportbot')}"


def test_chat_help_tells_a_newcomer_how_to_point_it_at_a_model(env) -> None:  # noqa: F811
    result = cli("chat", "--help", environ=env)
    assert result.returncode == 0
    for needle in ("LLM_MODEL", "OPENAI_API_KEY", "/llm-settings", "Ctrl-D", "supportbot doctor"):
        assert needle in result.stdout, needle


def test_a_closed_pipe_is_no_traceback(env) -> None:  # noqa: F811
    # `supportbot doctor | head -1`: head exits after one line, the next write gets EPIPE.
    result = subprocess.run(
        f"'{sys.executable}' -m bot doctor | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=env["HOME"],
    )
    assert len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
