"""`supportbot slack` as an operator runs it: `python -m bot slack` in HTTP mode as a subprocess,
with Slack's Web API and GPT faked on 127.0.0.1 and the tests' real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bot.conversation import ConversationKey, Message
from bot.ops.redis_server import free_port
from bot.platforms.frontdoor import CUT_WRITE_S
from bot.store import claim_key, history_key
from tests.conftest import repo_root
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    SIGNING_SECRET,
    TEAM,
    FakeSlack,
    event_body,
    mention,
    sign,
)

OPENAI_KEY = "sk-test-e2e-0123456789abcdefghijkl"


@pytest.fixture
def env(tmp_path: Path, fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server, redis):
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_", "OPENAI_", "REDIS", "SLACK_", "HISTORY_"))
    }
    base.update(
        HOME=str(tmp_path),
        PYTHONPATH=str(repo_root()),
        HF_HUB_OFFLINE="1",
        DATA_DIR=str(tmp_path / "data"),
        REDIS_URL=redis_server.url,
        LLM_MODEL="none",
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=fake_openai.base_url,
        OPENAI_MODEL="gpt-test",
        SYSTEM_PROMPT="You are the e2e persona.",
        SLACK_BOT_TOKEN=fake_slack.token,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=fake_slack.url,
        PORT=str(free_port()),
    )
    return base


def start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bot", "slack"],
        env=env,
        cwd=env["HOME"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def bot(env) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = start(env)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_until_up(proc, url)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_until_up(proc: subprocess.Popen[str], url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.communicate()[1]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the Slack app did not come up")


def post(url: str, body: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"{url}/slack/events", data=body.encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_signed_mention_is_answered_in_its_thread(bot, fake_slack, fake_openai):
    proc, url = bot
    body = json.dumps(event_body(mention("<@U0BOT> is the app up?", ts="1700.000100")))
    headers = {"Content-Type": "application/json", **sign(body)}
    assert post(url, body, headers) == 200
    fake_slack.wait_for(
        lambda: fake_slack.texts("C0GENERAL", "1700.000100") == ["echo: is the app up?"]
    )
    assert fake_openai.chat_requests[-1].body["messages"][0]["content"] == (
        "You are the e2e persona."
    )

    # Re-delivered by Slack: taken already, so ignored.
    assert post(url, body, {**headers, "X-Slack-Retry-Num": "1"}) == 200
    forged = {"Content-Type": "application/json", **sign(body, secret="not-the-secret")}
    assert post(url, body, forged) == 401

    status, ready = get(f"{url}/readyz")
    assert status == 200 and json.loads(ready)["status"] == "ready"
    status, metrics = get(f"{url}/metrics")
    assert status == 200
    fake_slack.wait_for(lambda: 'supportbot_duplicate_events_total{platform="slack"} 1.0' in get(
        f"{url}/metrics")[1])  # fmt: skip
    assert 'supportbot_questions_total{platform="slack"} 1.0' in metrics

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert len(fake_slack.thread("C0GENERAL", "1700.000100")) == 1
    for secret in (fake_slack.token, SIGNING_SECRET, OPENAI_KEY):
        assert secret not in out + err
    assert "Traceback" not in err


def test_missing_bot_token_is_one_line_naming_it(env):
    del env["SLACK_BOT_TOKEN"]
    result = subprocess.run(
        [sys.executable, "-m", "bot", "slack"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "supportbot: SLACK_BOT_TOKEN is not set: the Slack app needs its bot token (xoxb-…)"
    ]


def test_http_mode_without_signing_secret_refuses_to_start(env, fake_slack):
    del env["SLACK_SIGNING_SECRET"]
    result = subprocess.run(
        [sys.executable, "-m", "bot", "slack"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "SLACK_SIGNING_SECRET is not set" in line and "SLACK_APP_TOKEN" in line
    assert fake_slack.token not in result.stderr


def test_a_rejected_token_is_a_clear_message(env, fake_slack):
    env["SLACK_BOT_TOKEN"] = "xoxb-wrong-0000000000-0000000000-zzzzzzzzzzzzzzzz"
    result = subprocess.run(
        [sys.executable, "-m", "bot", "slack"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "supportbot: Slack rejected SLACK_BOT_TOKEN (auth.test: invalid_auth)"
    )
    assert "xoxb-wrong" not in result.stderr


def test_socket_mode_answers_and_serves_health_on_port(env, fake_slack):
    env["SLACK_APP_TOKEN"] = fake_slack.app_token
    del env["SLACK_SIGNING_SECRET"]  # not needed in Socket Mode
    proc = start(env)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{env['PORT']}")
        fake_slack.wait_for(lambda: fake_slack.socket_connected)
        fake_slack.send_envelope(event_body(mention("<@U0BOT> via socket", ts="1700.000200")))
        fake_slack.wait_for(
            lambda: fake_slack.texts("C0GENERAL", "1700.000200") == ["echo: via socket"]
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert fake_slack.app_token not in out + err and fake_slack.token not in out + err
    assert "Traceback" not in err and "ERROR" not in err, err


def test_sigterm_while_every_socket_upgrade_is_refused_exits_promptly_with_0(env, fake_slack):
    """Slack's Web API answers but its websocket refuses the upgrade (an outage, a proxy): the
    bot keeps trying, says it is not ready, and still stops at once on SIGTERM."""
    env["SLACK_APP_TOKEN"] = fake_slack.app_token
    del env["SLACK_SIGNING_SECRET"]
    fake_slack.refuse_socket = True
    proc = start(env)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_until_up(proc, url)
        fake_slack.wait_for(lambda: fake_slack.socket_attempts >= 1)
        status, ready = get(f"{url}/readyz")
        assert status == 503 and json.loads(ready)["checks"]["slack"].startswith("not connected")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert took < 5, f"took {took:.1f}s to stop"
    assert "Traceback" not in err, err
    assert fake_slack.app_token not in out + err


@pytest.mark.parametrize("method", ["auth.test", "apps.connections.open"])
def test_sigterm_while_slack_hangs_at_start_up_exits_promptly_with_0(env, fake_slack, method):
    env["SLACK_APP_TOKEN"] = fake_slack.app_token
    fake_slack.delay(method, 120)
    proc = start(env)
    try:
        fake_slack.wait_for(lambda: fake_slack.calls_to(method), timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert took < 5, f"took {took:.1f}s to stop"
    assert "Traceback" not in err, err


def test_a_rejected_app_token_is_a_clear_message(env, fake_slack):
    env["SLACK_APP_TOKEN"] = "xapp-1-wrong-0000000000-zzzzzzzzzzzzzzzz"
    result = subprocess.run(
        [sys.executable, "-m", "bot", "slack"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("supportbot: Slack rejected SLACK_APP_TOKEN (apps.connections.open")
    assert "xapp-1-wrong" not in result.stderr


# Lifecycle: the service starts only with a backend that can answer, and SIGTERM in the middle
# of a streamed answer finishes that answer, keeps it in history, and exits 0.

SLOW_ANSWER = "First part of a slow answer. " * 4 + "The end."


async def test_sigterm_during_a_streamed_answer_finishes_it_and_exits_0(
    env, fake_slack, fake_openai, redis: Redis
):
    fake_openai.answer(
        SLOW_ANSWER, chunks=[w + " " for w in SLOW_ANSWER.split()], chunk_delay_s=0.15
    )
    proc = start(env)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_until_up(proc, url)
        body = json.dumps(event_body(mention("<@U0BOT> tell me slowly", ts="1800.000100")))
        assert post(url, body, {"Content-Type": "application/json", **sign(body)}) == 200
        # The answer is streaming (the model has been asked and text is on its way)...
        fake_openai.wait_for(lambda: fake_openai.chat_requests, timeout_s=20)
        fake_slack.wait_for(lambda: fake_slack.thread("C0GENERAL", "1800.000100"))
        proc.send_signal(signal.SIGTERM)  # ...when the operator stops the bot.
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "finishing answers" in err
    final = " ".join(fake_slack.texts("C0GENERAL", "1800.000100"))
    assert final.split() == SLOW_ANSWER.split()  # the whole answer was delivered, not cut off
    key = ConversationKey("slack", TEAM, "C0GENERAL")
    assert [Message.decode(raw) for raw in await redis.lrange(history_key(key), 0, -1)] == [
        Message("user", "tell me slowly"),
        Message("assistant", SLOW_ANSWER),
    ]


async def test_sigterm_with_an_answer_longer_than_the_grace_closes_its_stream_with_a_notice(
    env, fake_slack, fake_openai
):
    """A 15 s answer, SIGTERM, SHUTDOWN_GRACE_SECONDS=5: the user sees the text so far and a
    notice, the stream is stopped (not left open), the log names the cut answer, exit 0."""
    words = [f"w{i} " for i in range(30)]
    fake_openai.answer("".join(words), chunks=words, chunk_delay_s=0.5)
    env["SHUTDOWN_GRACE_SECONDS"] = "5"
    proc = start(env)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_until_up(proc, url)
        body = json.dumps(event_body(mention("<@U0BOT> a long one", ts="1900.000100")))
        assert post(url, body, {"Content-Type": "application/json", **sign(body)}) == 200
        fake_slack.wait_for(lambda: fake_slack.thread("C0GENERAL", "1900.000100"), timeout_s=20)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert 5 <= took < 5 + CUT_WRITE_S + 5, f"took {took:.1f}s to stop"
    [answer] = fake_slack.thread("C0GENERAL", "1900.000100")
    assert answer.via == "stream" and not answer.streaming  # chat.stopStream closed it
    assert answer.text.startswith("w0 w1 ")
    assert answer.text.split()[-1] != "w29"  # cut before the end...
    assert "restarted before I could finish this answer" in answer.text  # ...and said so
    [cut_line] = [line for line in err.splitlines() if "cut by shutdown" in line]
    error_id = re.search(r"error_id=(\w+)", cut_line)
    assert error_id and error_id.group(1) in answer.text
    assert "C0GENERAL" in cut_line


def test_refuses_to_start_when_no_backend_can_answer(env):
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    proc = start(env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("supportbot:")]
    assert len(lines) == 1 and "no backend can answer" in lines[0]
    assert "OPENAI_API_KEY" in lines[0] and "Traceback" not in err


# Two replicas over one Redis, as `supportbot slack` processes: one is killed with SIGKILL in the
# middle of an answer (no clean-up of any kind), and Slack's re-delivery of that event to the
# other is answered there, exactly once, with the conversation's history intact.


async def test_an_event_whose_replica_was_sigkilled_mid_answer_is_answered_once_by_another(
    env, fake_slack, fake_openai, redis: Redis
):
    words = [f"w{i} " for i in range(40)]
    fake_openai.answer("".join(words), chunks=words, chunk_delay_s=0.25)  # ~10 s: A never ends
    env["EVENT_LEASE_SECONDS"] = "3"
    a_env, b_env = env, {**env, "PORT": str(free_port())}
    a, b = start(a_env), start(b_env)
    a_url, b_url = (f"http://127.0.0.1:{e['PORT']}" for e in (a_env, b_env))
    try:
        wait_until_up(a, a_url)
        wait_until_up(b, b_url)
        event = mention("<@U0BOT> will you finish?", ts="2000.000100")
        body = json.dumps(event_body(event, event_id="Ev2000"))
        headers = {"Content-Type": "application/json", **sign(body)}
        assert post(a_url, body, headers) == 200
        fake_slack.wait_for(lambda: fake_slack.thread("C0GENERAL", "2000.000100"), timeout_s=20)
        fake_slack.wait_for(lambda: "w3" in fake_slack.texts("C0GENERAL", "2000.000100")[0])
        a.kill()  # SIGKILL mid-answer: no renewal, no done mark, no withdrawal
        a.communicate(timeout=10)

        # The lease A left behind still runs (3 s, renewed each second): a copy now is taken.
        claim = claim_key("slack", "Ev2000")
        lease_ms = await redis.pttl(claim)
        if lease_ms > 1000:
            assert post(b_url, body, {**headers, "X-Slack-Retry-Num": "1"}) == 200
        deadline = time.monotonic() + 10
        while await redis.exists(claim) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        fake_openai.answer("the whole answer")
        assert post(b_url, body, {**headers, "X-Slack-Retry-Num": "2"}) == 200
        fake_slack.wait_for(
            lambda: "the whole answer" in fake_slack.texts("C0GENERAL", "2000.000100"),
            timeout_s=20,
        )
        # Later copies, to B or to a restarted A, are duplicates of an answered event.
        assert post(b_url, body, {**headers, "X-Slack-Retry-Num": "3"}) == 200
        a = start(a_env)
        wait_until_up(a, a_url)
        assert post(a_url, body, {**headers, "X-Slack-Retry-Num": "3"}) == 200
        time.sleep(1.0)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    thread = fake_slack.texts("C0GENERAL", "2000.000100")
    assert thread.count("the whole answer") == 1, thread  # answered once, by B
    assert len(thread) == 2 and thread[0].startswith("w0 w1 w2 w3")  # and A's half, left as is
    assert len(fake_openai.chat_requests) == 2  # A's and B's: the copies asked nothing
    key = ConversationKey("slack", TEAM, "C0GENERAL")
    assert [Message.decode(raw) for raw in await redis.lrange(history_key(key), 0, -1)] == [
        Message("user", "will you finish?"),
        Message("assistant", "the whole answer"),
    ]
