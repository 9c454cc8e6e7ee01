"""Re-delivery and replicas: 1,000 Slack events, each delivered three times (the original and
Slack's retries 1 and 2), shuffled, sent concurrently and spread over two instances of the real
app (bolt on signed requests) that share one Redis → exactly 1,000 answers.

Run with `-s` to see the figures the README quotes.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from typing import Any

import pytest

from bot.conversation import ConversationKey
from bot.llm.chain import LLMChain
from bot.ops import metrics
from bot.ops.redis_server import RedisServer
from bot.platforms.slack.events import Tuning
from bot.service import SupportService
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

pytestmark = pytest.mark.usefixtures("redis")  # a flushed database

EVENTS = 1_000
CHANNELS = 50  # 20 questions per channel: 40 history messages, HISTORY_MAX_MESSAGES' default
DELIVERIES = (None, 1, 2)  # X-Slack-Retry-Num of each copy; None = the original
IN_FLIGHT = 64  # requests on the wire at once
TUNING = Tuning(rate_limit_jitter_s=0.0, drain_timeout_s=5.0)


def duplicates_ignored() -> float:
    sample = metrics.REGISTRY.get_sample_value(
        "supportbot_duplicate_events_total", {"platform": "slack"}
    )
    return sample or 0.0


def where(i: int) -> tuple[str, str]:
    """Event i's channel and ts (its thread)."""
    return f"C0RD{i % CHANNELS:02d}", f"1700000000.{i:06d}"


async def deliver_all(apps: list[RunningApp], bodies: list[dict[str, Any]], seed: int) -> None:
    """Every body three times, in a shuffled order, each copy to a randomly chosen instance."""
    rng = random.Random(seed)
    copies = [(body, retry, rng.choice(apps)) for body in bodies for retry in DELIVERIES]
    rng.shuffle(copies)
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def send(body: dict[str, Any], retry: int | None, app: RunningApp) -> None:
        async with gate:
            status, text = await app.post(
                json.dumps(body), content_type="application/json", retry=retry
            )
        assert status == 200, (status, text)

    await asyncio.gather(*(send(*copy) for copy in copies))


async def settle(apps: list[RunningApp], received: int, timeout_s: float = 60.0) -> None:
    async def wait() -> None:
        while sum(app.bot.received for app in apps) < received:
            await asyncio.sleep(0.02)
        for app in apps:
            await app.bot.idle()

    await asyncio.wait_for(wait(), timeout_s)


async def test_a_thousand_events_delivered_three_times_to_two_replicas_are_answered_once(
    fake_slack: FakeSlack, redis_server: RedisServer
) -> None:
    settings = slack_settings(
        fake_slack, redis_url=redis_server.url, openai_url="http://127.0.0.1:9/v1"
    )
    # One chunk per answer, and production's update interval: the Slack calls are the usual
    # status, start and stop of a stream, not a live update per chunk.
    backends = [ScriptedLLM(label=f"replica-{n}", chunk_size=1_000) for n in "ab"]
    bodies = [
        event_body(mention(f"<@U0BOT> question {i}", channel=where(i)[0], ts=where(i)[1]))
        for i in range(EVENTS)
    ]
    ignored_before = duplicates_ignored()
    async with (
        running_slack_app(settings, llm=LLMChain(backends[0], None), tuning=TUNING) as first,
        running_slack_app(settings, llm=LLMChain(backends[1], None), tuning=TUNING) as second,
    ):
        apps = [first, second]
        await deliver_all(apps, bodies, seed=7)
        await settle(apps, EVENTS * len(DELIVERIES))
        service: SupportService = first.runtime.service
        histories = {
            channel: await service.store.history(ConversationKey("slack", TEAM, channel))
            for channel in {where(i)[0] for i in range(EVENTS)}
        }

    received = [app.bot.received for app in apps]
    asked = [call.messages[-1]["content"] for backend in backends for call in backend.calls]
    replies: dict[tuple[str, str | None], list[str]] = defaultdict(list)
    for posted in fake_slack.messages():
        if not posted.deleted:
            replies[(posted.channel, posted.thread_ts)].append(posted.text)
    answered = [i for i in range(EVENTS) if replies.get(where(i))]
    lost = EVENTS - len(answered)
    twice = sum(len(replies[where(i)]) > 1 for i in answered)
    ignored = duplicates_ignored() - ignored_before
    interleaved = sum(
        [m.role for m in history] != ["user", "assistant"] * (len(history) // 2)
        for history in histories.values()
    )

    print(
        f"\nre-delivery: {EVENTS} events, {EVENTS * len(DELIVERIES)} deliveries "
        f"(received {received[0]} + {received[1]} by the two replicas), "
        f"{len(asked)} backend calls ({len(backends[0].calls)} + {len(backends[1].calls)}), "
        f"{len(answered)} threads answered, {twice} answered twice, "
        f"{ignored:.0f} duplicates ignored, {lost} lost; {interleaved} of {CHANNELS} channel "
        "histories interleave turns answered by different replicas"
    )
    assert sum(received) == EVENTS * len(DELIVERIES)
    assert min(received) > EVENTS  # both replicas took a real share of the deliveries
    assert all(backend.calls for backend in backends)
    assert sorted(asked) == sorted(f"question {i}" for i in range(EVENTS))  # each exactly once
    assert lost == 0 and twice == 0
    for i in range(EVENTS):
        assert replies[where(i)] == [f"echo: question {i}"]
    assert ignored == EVENTS * (len(DELIVERIES) - 1)
    # Each channel's history holds its 20 questions and their answers, once each, every answer
    # after its question. (Not strictly alternating: each replica orders the turns of a channel
    # among its own questions, so two replicas answering in one channel at once interleave.)
    for channel, history in histories.items():
        expected = [f"question {i}" for i in range(EVENTS) if where(i)[0] == channel]
        contents = [m.content for m in history]
        assert sorted(m.content for m in history if m.role == "user") == sorted(expected)
        assert sorted(m.content for m in history if m.role == "assistant") == sorted(
            f"echo: {q}" for q in expected
        )
        for question in expected:
            assert contents.index(question) < contents.index(f"echo: {question}")
