"""Redis faults: Redis stopped and restarted in the middle of a run, with the bot left running.

A real redis-server on a fixed port with a data directory and its append-only file (SIGTERM makes
it flush the file), so what Redis acknowledged survives the restart. The bot's client is the
one the runtime makes (`bot.ops.redis_client.connect_redis`). Questions are held inside our
backend while Redis goes away, so that what happens when is decided by the test, not by timing.

Behaviour checked:
- after a restart the bot reconnects by itself: no restart of the bot, no question lost to a
  stale connection;
- a question asked during a short restart waits for Redis and is answered;
- during a longer outage every question ends with a clear message with an error id (never an
  exception or a traceback): "couldn't save the answer" for one in flight, "couldn't reach my
  conversation store" for one asked then;
- nothing Redis acknowledged disappears: the history read after yet another restart holds
  every stored turn, in order.
- Slack: the event claim cannot be made while Redis is down. The bot answers anyway (as the
  Discord bot does): bolt has already acknowledged the event, so Slack will not send it again,
  and refusing would lose the question. The service then says the store is unreachable; Slack's
  retry of that event, once Redis is back, is answered, because no replica claimed it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bot.conversation import ConversationKey, Message
from bot.llm.base import Delta, Finished, Prompt, StreamEvent
from bot.llm.chain import LLMChain
from bot.ops.redis_client import connect_redis
from bot.ops.redis_server import RedisServer, free_port
from bot.sampling import SamplingSettings
from bot.service import AnswerEvent, Failure, SupportService, User
from tests.conftest import make_service, make_store
from tests.fixtures.fake_slack import (
    TEAM,
    FakeSlack,
    RunningApp,
    event_body,
    mention,
    running_slack_app,
    slack_settings,
)
from tests.support.backends import ScriptedLLM

USER = User("U1")
SAVED_NOTHING = "couldn't reach my conversation store"
SAVED_QUESTION_ONLY = "couldn't save the answer"


@dataclass
class Gated(ScriptedLLM):
    """Answers only once `gate` is open; `waiting` counts the questions held at the gate."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        async for event in super().stream(prompt, sampling):
            yield event

    async def hold(self, count: int) -> None:
        """Wait until `count` questions are held (each has been stored by then)."""
        while self.waiting < count:
            await asyncio.sleep(0.005)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    redis = RedisServer(tmp_path / "redis", port=free_port(), persist=True).start()
    yield redis
    redis.stop()


async def stop(server: RedisServer) -> None:
    """SIGTERM (Redis flushes its append-only file) and wait, off the event loop: the bot keeps
    running meanwhile, as it would beside a real Redis restart."""
    await asyncio.to_thread(server.stop)


async def start(server: RedisServer) -> None:
    await asyncio.to_thread(server.start)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not noisy, [r.getMessage() for r in noisy]


class Ledger:
    """What the service acknowledged, per conversation, in the order it was stored."""

    def __init__(self, service: SupportService) -> None:
        self.service = service
        self.acknowledged: dict[ConversationKey, list[Message]] = defaultdict(list)
        self.failures: list[Failure] = []
        self.finished = 0

    async def ask(self, key: ConversationKey, question: str) -> AnswerEvent:
        events = [event async for event in self.service.ask(key, USER, question)]
        final = events[-1]
        text = "".join(e.text for e in events if isinstance(e, Delta))
        if isinstance(final, Finished):
            self.finished += 1
            self.acknowledged[key] += [Message("user", question), Message("assistant", text)]
        else:
            assert isinstance(final, Failure), events
            self.failures.append(final)
            if SAVED_QUESTION_ONLY in final.message:  # stored when its turn began
                self.acknowledged[key].append(Message("user", question))
        return final


def is_subsequence(wanted: list[Message], stored: list[Message]) -> bool:
    remaining = iter(stored)
    return all(message in remaining for message in wanted)


async def test_the_service_rides_out_restarts_and_reports_an_outage_without_losing_history(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    redis = connect_redis(server.url)
    backend = Gated(chunk_size=1_000)
    service = make_service(redis, backend, max_messages=1_000)
    await service.llm.start()
    ledger = Ledger(service)
    channels = [ConversationKey("slack", TEAM, f"C0FAULT{i}") for i in range(8)]
    others = [ConversationKey("slack", TEAM, f"C0OTHER{i}") for i in range(8)]

    # Warm-up: a turn in every channel, so the pool holds connections that a restart makes stale.
    backend.gate.set()
    for n, key in enumerate(channels):
        await ledger.ask(key, f"before {n}")

    # 1. A restart while questions are with the backend: their answers are stored afterwards,
    #    on connections that Redis closed.
    backend.gate.clear()
    turns = [
        asyncio.create_task(ledger.ask(key, f"in flight {n}")) for n, key in enumerate(channels)
    ]
    await backend.hold(len(channels))
    await stop(server)
    await start(server)
    backend.gate.set()
    assert all(isinstance(outcome, Finished) for outcome in await asyncio.gather(*turns))

    # 2. Questions asked while Redis is restarting wait for it and are answered.
    await stop(server)
    turns = [
        asyncio.create_task(ledger.ask(key, f"during restart {n}"))
        for n, key in enumerate(channels)
    ]
    await start(server)
    assert all(isinstance(outcome, Finished) for outcome in await asyncio.gather(*turns))
    assert ledger.failures == []

    # 3. A longer outage: the answers of questions in flight cannot be stored, and new questions
    #    cannot start. Redis stays down until every one of them has ended.
    backend.gate.clear()
    in_flight = [
        asyncio.create_task(ledger.ask(key, f"outage {n}")) for n, key in enumerate(channels)
    ]
    await backend.hold(len(channels))
    await stop(server)
    asked_meanwhile = [
        asyncio.create_task(ledger.ask(key, f"while down {n}")) for n, key in enumerate(others)
    ]
    backend.gate.set()
    for task in in_flight:
        failure = await task
        assert isinstance(failure, Failure) and SAVED_QUESTION_ONLY in failure.message
    for task in asked_meanwhile:
        failure = await task
        assert isinstance(failure, Failure) and SAVED_NOTHING in failure.message
    for failure in ledger.failures:
        assert failure.reason == "redis" and failure.error_id
        assert f"(error id: {failure.error_id})" in failure.message
        assert f"[error_id={failure.error_id}]" in caplog.text
    await start(server)

    # 4. Back: the same service, the same client, answers again.
    for n, key in enumerate(channels + others):
        assert isinstance(await ledger.ask(key, f"after {n}"), Finished)
    assert service.active_conversations == 0
    await redis.aclose()
    no_tracebacks(caplog)

    # 5. Everything acknowledged is there, in order, after one more restart, read afresh.
    await stop(server)
    await start(server)
    fresh = Redis.from_url(server.url)
    try:
        history = make_store(fresh, max_messages=1_000)
        for key in channels + others:
            stored = await history.history(key)
            assert is_subsequence(ledger.acknowledged[key], stored), (key, stored)
    finally:
        await fresh.aclose()
    stored_turns = sum(len(messages) for messages in ledger.acknowledged.values())
    print(
        f"\nredis faults (service): {ledger.finished} answered, {len(ledger.failures)} clear "
        f"messages during the outage, {stored_turns} acknowledged messages, none lost"
    )
    assert ledger.finished == 4 * len(channels) + len(others)
    assert len(ledger.failures) == len(channels) + len(others)


# -- through the Slack app ---------------------------------------------------------------------


async def thread_texts(fake_slack: FakeSlack, channel: str, ts: str, count: int) -> list[str]:
    """The finished replies of a thread, once there are `count` of them."""

    def done() -> list[str]:
        return [m.text for m in fake_slack.thread(channel, ts) if not m.streaming]

    await fake_slack.wait_until(lambda: len(done()) >= count, timeout_s=15)
    return done()


async def ready(app: RunningApp) -> int:
    async with app.session.get(f"{app.url}/readyz") as response:
        return response.status


async def test_the_slack_app_keeps_answering_across_a_redis_outage(
    server: RedisServer, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = slack_settings(fake_slack, redis_url=server.url, openai_url="http://127.0.0.1:9/v1")
    backend = ScriptedLLM(chunk_size=1_000)
    async with running_slack_app(settings, llm=LLMChain(backend)) as app:
        await app.send_event(mention("<@U0BOT> first", ts="1700.000100"))
        assert await thread_texts(fake_slack, "C0GENERAL", "1700.000100", 1) == ["echo: first"]

        await stop(server)
        assert await ready(app) == 503
        # The event is acknowledged (bolt needs no Redis for that), then cannot be claimed.
        down = event_body(mention("<@U0BOT> second", ts="1700.000200"))
        status, _ = await app.post(json.dumps(down), content_type="application/json")
        assert status == 200
        (notice,) = await thread_texts(fake_slack, "C0GENERAL", "1700.000200", 1)
        assert SAVED_NOTHING in notice
        error_id = re.search(r"error id: (\w+)", notice)
        assert error_id and f"[error_id={error_id.group(1)}]" in caplog.text
        assert "answering without the claim" in caplog.text
        status, _ = await app.command("temperature 0.5", fake_slack.response_url())
        assert status == 200
        await fake_slack.wait_until(lambda: fake_slack.responses)
        assert "nothing was changed" in fake_slack.responses[-1]["text"]
        assert "error id" in fake_slack.responses[-1]["text"]
        await app.bot.idle()

        await start(server)
        assert await ready(app) == 200
        # Slack's retry of the event nobody could claim is answered; a further copy is not.
        await app.redeliver(down, retry=1)
        texts = await thread_texts(fake_slack, "C0GENERAL", "1700.000200", 2)
        assert texts == [notice, "echo: second"]
        await app.redeliver(down, retry=2)
        await app.send_event(mention("<@U0BOT> third", ts="1700.000300"))
        await app.settle(5)
        assert await thread_texts(fake_slack, "C0GENERAL", "1700.000300", 1) == ["echo: third"]
        assert len(fake_slack.thread("C0GENERAL", "1700.000200")) == 2

        # The first turn, stored before the outage, reached the third question's prompt.
        assert [m["content"] for m in backend.calls[-1].messages[1:]] == [
            "first",
            "echo: first",
            "second",
            "echo: second",
            "third",
        ]
        key = ConversationKey("slack", TEAM, "C0GENERAL")
        stored = await app.runtime.store.history(key)
        assert [m.content for m in stored] == [
            "first",
            "echo: first",
            "second",
            "echo: second",
            "third",
            "echo: third",
        ]
    no_tracebacks(caplog)
