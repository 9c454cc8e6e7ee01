"""How an answer reaches a Slack thread: streamed or updated, throttled, complete after 429s,
split when long, rendered as mrkdwn, and failures told with an error id."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from bot.llm.base import Delta, Finished
from bot.platforms.frontdoor import ProgressiveMessage
from bot.platforms.slack.app import web_client
from bot.platforms.slack.events import Tuning
from bot.platforms.slack.mrkdwn import to_mrkdwn
from bot.platforms.slack.sink import Features, Place, SlackSink
from bot.platforms.text import split_message
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    FakeSlack,
    mention,
    running_slack_app,
    slack_settings,
)

pytestmark = pytest.mark.usefixtures("redis")

THREAD = "1700.000100"


@pytest.fixture
def settings(fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server):
    return slack_settings(fake_slack, redis_url=redis_server.url, openai_url=fake_openai.base_url)


def tuning(**changes) -> Tuning:
    values = {"update_interval_s": 0.2, "rate_limit_jitter_s": 0.0, "drain_timeout_s": 5.0}
    return Tuning(**{**values, **changes})


async def ask(app, fake_slack: FakeSlack, question: str = "tell me") -> list[str]:
    """Mention the bot, wait for the answer to finish, return the thread's texts."""
    await app.send_event(mention(f"<@U0BOT> {question}", ts=THREAD))
    await app.settle(1)
    return fake_slack.texts("C0GENERAL", THREAD)


SLOW_WORDS = [f"word{i} " for i in range(40)]  # 40 chunks, 25 ms apart: about a second


async def test_streaming_is_throttled_and_ends_with_the_whole_answer(
    settings, fake_slack, fake_openai
):
    fake_openai.answer(chunks=SLOW_WORDS, chunk_delay_s=0.025)
    async with running_slack_app(settings, tuning=tuning()) as app:
        began = time.monotonic()
        texts = await ask(app, fake_slack)
        elapsed = time.monotonic() - began
    assert texts == ["".join(SLOW_WORDS).strip()]
    appends = fake_slack.calls_to("chat.appendStream")
    # One call per 0.2 s interval at most (plus the start and the stop), yet it did stream.
    assert 2 <= len(appends) <= elapsed / 0.2 + 1, (len(appends), elapsed)
    assert len(fake_slack.calls_to("chat.startStream", "chat.stopStream")) == 2


async def test_updates_are_throttled_without_streaming(settings, fake_slack, fake_openai):
    fake_slack.streaming = "not_allowed"
    fake_slack.status_error = "not_allowed"
    fake_openai.answer(chunks=SLOW_WORDS, chunk_delay_s=0.025)
    async with running_slack_app(settings, tuning=tuning()) as app:
        began = time.monotonic()
        texts = await ask(app, fake_slack)
        elapsed = time.monotonic() - began
    assert texts == ["".join(SLOW_WORDS).strip()]
    updates = fake_slack.calls_to("chat.update")
    assert 3 <= len(updates) <= elapsed / 0.2 + 2, (len(updates), elapsed)
    # While the answer grows the cursor says more is coming; the final text has none.
    assert updates[0].body["text"].endswith(" …")
    assert updates[-1].body["text"] == texts[0]


async def test_the_final_text_arrives_after_a_429_with_retry_after(
    settings, fake_slack, fake_openai
):
    fake_openai.answer("the complete answer")
    fake_slack.rate_limit("chat.stopStream", times=1, retry_after="1")
    async with running_slack_app(settings, tuning=tuning()) as app:
        began = time.monotonic()
        texts = await ask(app, fake_slack)
        waited = time.monotonic() - began
    assert texts == ["the complete answer"]
    assert len(fake_slack.calls_to("chat.stopStream")) == 2  # the 429, then the retry
    assert waited >= 1.0  # Retry-After was honoured, not hammered


async def test_update_mode_survives_repeated_429s(settings, fake_slack, fake_openai):
    fake_slack.streaming = "not_allowed"
    fake_slack.status_error = "not_allowed"
    fake_openai.answer(chunks=SLOW_WORDS[:10], chunk_delay_s=0.02)
    fake_slack.rate_limit("chat.update", times=3, retry_after="0.1")
    async with running_slack_app(settings, tuning=tuning()) as app:
        texts = await ask(app, fake_slack)
    assert texts == ["".join(SLOW_WORDS[:10]).strip()]


LONG_ANSWER = (
    "Here is how to configure the service.\n\n"
    + "\n\n".join(f"Paragraph {i}: " + "details " * 12 for i in range(6))
    + "\n\n```python\n"
    + "".join(f"setting_{i} = {i}  # explain it\n" for i in range(12))
    + "```\n\nThat is all."
)


def assert_split_well(texts: list[str], limit: int) -> None:
    assert len(texts) > 2
    for text in texts:
        assert len(text) <= limit
        assert text.count("```") % 2 == 0, text  # never cut inside a code block


async def test_a_long_streamed_answer_is_split_into_thread_messages(
    settings, fake_slack, fake_openai
):
    fake_openai.answer(LONG_ANSWER)
    async with running_slack_app(settings, tuning=tuning(message_limit=300)) as app:
        texts = await ask(app, fake_slack)
    assert texts == split_message(LONG_ANSWER, 300)
    assert_split_well(texts, 300)
    assert all(m.thread_ts == THREAD for m in fake_slack.messages())


async def test_a_long_updated_answer_is_split_into_thread_messages(
    settings, fake_slack, fake_openai
):
    fake_slack.streaming = "not_allowed"
    fake_openai.answer(chunks=re.findall(r"\S+\s*", LONG_ANSWER), chunk_delay_s=0.002)
    async with running_slack_app(settings, tuning=tuning(message_limit=300)) as app:
        texts = await ask(app, fake_slack)
    assert texts == [to_mrkdwn(part) for part in split_message(LONG_ANSWER, 300)]
    assert_split_well(texts, 300)


async def test_markdown_becomes_mrkdwn_korean_included(settings, fake_slack, fake_openai):
    fake_slack.streaming = "not_allowed"
    fake_openai.answer(
        "**주문번호**를 알려주시면 ~~바로~~ *확인*해 드릴게요. [도움말](https://help.example)"
    )
    async with running_slack_app(settings, tuning=tuning()) as app:
        texts = await ask(app, fake_slack)
    assert texts == [
        "*주문번호*\u200b를 알려주시면 ~바로~ _확인_\u200b해 드릴게요. <https://help.example|도움말>"
    ]


async def test_a_failure_is_a_short_message_with_the_logged_error_id(
    settings, fake_slack, fake_openai, caplog
):
    fake_openai.fail(500, times=5, message="upstream exploded: Traceback secret-detail")
    async with running_slack_app(settings, tuning=tuning()) as app:
        [text] = await ask(app, fake_slack)
    error_id = re.search(r"error id: (\w+)", text)
    assert error_id and f"error_id={error_id.group(1)}" in caplog.text
    assert "exploded" not in text and "Traceback" not in text


async def test_a_split_point_that_moves_back_is_corrected(fake_slack):
    """Text already streamed into a message can end up past a later split point: the message is
    then closed and rewritten, and the rest continues in the next message."""

    async def answer():
        # "x…\n\ny…" fits one 40-char message until the second paragraph outgrows it.
        for piece in ["x" * 20 + "\n\n", "y" * 15, "y" * 10]:
            yield Delta(piece)
            await asyncio.sleep(0.1)  # let the writer show each stage
        yield Finished("test", 1, 1, 0.0, 0.1)

    settings = slack_settings(fake_slack, redis_url="redis://unused", openai_url="http://unused")
    async with aiohttp.ClientSession() as session:
        client = web_client(settings, session, tuning())
        place = Place("C0GENERAL", THREAD, "T0TEST", "U0ALICE")
        sink = SlackSink(client, place, Features(), limit=40)
        message = ProgressiveMessage(sink, interval_s=0.0, where="test")
        message.begin()
        await message.deliver(answer())

    assert fake_slack.texts("C0GENERAL", THREAD) == ["x" * 20, "y" * 25]
    rewrite = fake_slack.calls_to("chat.update")
    assert [c.body["markdown_text"] for c in rewrite] == ["x" * 20]


async def test_a_stream_that_breaks_midway_is_finished_by_updates(
    settings, fake_slack, fake_openai
):
    fake_openai.answer(chunks=SLOW_WORDS[:20], chunk_delay_s=0.02)
    # More 429s than the client retries: the append fails as an expired stream would.
    fake_slack.rate_limit("chat.appendStream", times=3, retry_after="0")
    async with running_slack_app(settings, tuning=tuning(rate_limit_retries=2)) as app:
        texts = await ask(app, fake_slack)
    assert texts == ["".join(SLOW_WORDS[:20]).strip()]
    [reply] = fake_slack.thread("C0GENERAL", THREAD)
    assert reply.via == "stream"
    # Rewritten as markdown, as it began: the final one in a markdown block above the buttons.
    final = fake_slack.calls_to("chat.update")[-1].body
    assert final["blocks"][0] == {"type": "markdown", "text": texts[0]}
    assert final["blocks"][-1]["type"] == "actions"
