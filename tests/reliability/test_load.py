"""Load: 200 concurrent mentions over 20 channels through the real Slack app, an instant backend,
real Redis → every question and answer stored, in order per channel; no task leaked; memory flat.

The load runs three rounds in one app, each in 20 new channels (so anything kept per channel would
show as growth). Leaks are judged between rounds 2 and 3, after round 1 has warmed every cache
(metric label sets, bolt's and aiohttp's lazily built state, the Slack feature table).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import sys

import pytest

from bot.conversation import ConversationKey
from bot.llm.chain import LLMChain
from bot.ops.redis_server import RedisServer
from bot.platforms.slack.events import Tuning
from tests.fixtures.fake_slack import (
    TEAM,
    FakeSlack,
    RunningApp,
    mention,
    running_slack_app,
    slack_settings,
)
from tests.support.backends import ScriptedLLM

pytestmark = pytest.mark.usefixtures("redis")  # a flushed database

CHANNELS = 20
PER_CHANNEL = 10
ROUNDS = 4
TUNING = Tuning(rate_limit_jitter_s=0.0, drain_timeout_s=5.0)

# Memory, judged by what the last rounds (200 questions each, after two rounds of warm-up) leave
# behind once garbage is collected and the log records pytest keeps are dropped. Measured: the
# bot's own objects and asyncio's tasks and futures do not change at all, and the interpreter's
# allocated blocks move by +80 to +300, now and then by +2,000 in one round (keep-alive
# connections of the test's HTTP clients, the fake Slack's thread, logging's caches). A leak
# grows in every round, so the smaller growth of the last two rounds is judged. The bounds:
# - the bot's objects and asyncio tasks/futures: a few, for objects in flight when counted; a
#   leak of one of them per question or per channel adds 200 or 20;
OWN_OBJECT_GROWTH = 10
# - allocated blocks (every Python object and small buffer is one): several times the noise,
#   and what a leak of 10 small objects per question (a task alone is more) adds.
BLOCK_GROWTH = 2_000


def where(round_: int, channel: int, question: int) -> tuple[str, str]:
    """(channel, ts) of one mention; every round has channels of its own."""
    return f"C0L{round_}X{channel:02d}", f"17000{round_}{channel:02d}.{question:06d}"


def text(round_: int, channel: int, question: int) -> str:
    return f"round {round_} channel {channel} question {question}"


async def run_round(app: RunningApp, round_: int) -> None:
    """200 mentions at once; returns when every answer is done."""
    seen = app.bot.received
    mentions = [
        mention(f"<@U0BOT> {text(round_, c, q)}", channel=where(round_, c, q)[0], ts=ts)
        for c in range(CHANNELS)
        for q in range(PER_CHANNEL)
        for ts in [where(round_, c, q)[1]]
    ]
    await asyncio.gather(*(app.send_event(event) for event in mentions))
    await asyncio.wait_for(app.settle(seen + len(mentions)), 60)


async def check_round(app: RunningApp, fake_slack: FakeSlack, round_: int) -> None:
    store = app.runtime.store
    for c in range(CHANNELS):
        channel = where(round_, c, 0)[0]
        stored = await store.history(ConversationKey("slack", TEAM, channel))
        # Alternating: each question followed by its own answer, all ten questions there.
        assert [m.role for m in stored] == ["user", "assistant"] * PER_CHANNEL, channel
        for ask, answer in zip(stored[::2], stored[1::2], strict=True):
            assert answer.content == f"echo: {ask.content}"
        assert sorted(m.content for m in stored[::2]) == sorted(
            text(round_, c, q) for q in range(PER_CHANNEL)
        )
        for q in range(PER_CHANNEL):
            assert fake_slack.texts(*where(round_, c, q)) == [f"echo: {text(round_, c, q)}"]


def forget_records(fake_slack: FakeSlack, backend: ScriptedLLM) -> None:
    """Drop what the fakes recorded (checked already), so that only the bot's memory is left."""
    with fake_slack._lock:
        fake_slack.calls.clear()
        fake_slack._messages.clear()
        fake_slack.statuses.clear()
        fake_slack.responses.clear()
    backend.calls.clear()


def drop_kept_log_records() -> None:
    """pytest keeps every log record of a test, and its text, until the test ends (the suite
    logs at DEBUG): the harness's memory, not the bot's. Emptied after each round, so a failure
    report shows the last round's log. (The whole-suite secrets scan reads each record as it is
    made, so it still sees them all.)"""
    for handler in logging.getLogger().handlers:
        if isinstance(getattr(handler, "records", None), list) and hasattr(handler, "reset"):
            handler.reset()


def bookkeeping(app: RunningApp) -> dict[str, int]:
    """Everything the bot keeps per question or per channel while it works: empty when idle."""
    return {
        "answer tasks": len(app.bot.door.tasks),
        "conversation locks": app.runtime.service.active_conversations,
        "redis connections in use": len(
            app.runtime.store.redis.connection_pool._in_use_connections
        ),
    }


def own_objects() -> collections.Counter[str]:
    """Live objects of the bot's types, and asyncio tasks and futures of the bot's loop, by type.

    (Not the fake Slack's: it runs on a loop of its own, as Slack across the network, with a
    handler per keep-alive connection the bot's client opened, which varies with timing within
    the client's connection limit.)"""
    gc.collect()
    loop = asyncio.get_running_loop()
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = kind.__dict__.get("__module__")
        ours = isinstance(module, str) and module.startswith("bot.")
        # type(obj), not isinstance(obj, ...): that reads obj.__class__, and some of torch's
        # objects warn when anything reads their attributes.
        if ours or (issubclass(kind, asyncio.Future) and obj.get_loop() is loop):
            counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return counts


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_200_concurrent_mentions_are_stored_in_order_without_leaks(
    fake_slack: FakeSlack, redis_server: RedisServer
) -> None:
    settings = slack_settings(
        fake_slack, redis_url=redis_server.url, openai_url="http://127.0.0.1:9/v1"
    )
    backend = ScriptedLLM(chunk_size=1_000)
    tasks_before = other_tasks()
    async with running_slack_app(settings, llm=LLMChain(backend, None), tuning=TUNING) as app:
        objects: list[collections.Counter[str]] = []
        blocks: list[int] = []
        tasks: list[int] = []
        for round_ in range(1, ROUNDS + 1):
            await run_round(app, round_)
            assert len(backend.calls) == CHANNELS * PER_CHANNEL
            await check_round(app, fake_slack, round_)
            forget_records(fake_slack, backend)
            drop_kept_log_records()
            assert bookkeeping(app) == dict.fromkeys(bookkeeping(app), 0)
            objects.append(own_objects())  # collects garbage first
            blocks.append(sys.getallocatedblocks())
            tasks.append(len(other_tasks()))
    await asyncio.sleep(0)  # let tasks that were just cancelled finish
    leaked = other_tasks() - tasks_before

    growth = objects[-1] - objects[-2]
    block_growth = min(blocks[-1] - blocks[-2], blocks[-2] - blocks[-3])
    print(
        f"\nload: {ROUNDS} rounds of {CHANNELS * PER_CHANNEL} concurrent mentions over "
        f"{CHANNELS} channels, every turn stored in order; bookkeeping empty after each round; "
        f"tasks after each round {tasks}, {len(leaked)} left after the app stopped; the bot's "
        f"objects and asyncio tasks/futures after each round "
        f"{[sum(c.values()) for c in objects]}; allocated blocks after each round {blocks}"
    )
    assert not leaked, leaked
    assert tasks[-1] <= tasks[-2]
    assert sum(growth.values()) <= OWN_OBJECT_GROWTH, growth
    assert block_growth <= BLOCK_GROWTH
