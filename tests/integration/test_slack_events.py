"""The Slack app through bolt's real dispatch: signed HTTP requests to the running aiohttp app,
Slack's Web API faked on 127.0.0.1, GPT faked on 127.0.0.1, real Redis.

Which events become questions, where answers go, and that each event is answered exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest

from bot.conversation import ConversationKey
from bot.ops import metrics
from bot.ops.logging import RedactingFilter
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    BOT_TOKEN,
    SIGNING_SECRET,
    TEAM,
    FakeSlack,
    event_body,
    mention,
    message,
    running_slack_app,
    slack_settings,
)

pytestmark = pytest.mark.usefixtures("redis")


@pytest.fixture
def settings(fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server):
    def make(**overrides):
        return slack_settings(
            fake_slack, redis_url=redis_server.url, openai_url=fake_openai.base_url, **overrides
        )

    return make


def duplicates() -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "supportbot_duplicate_events_total", {"platform": "slack"}
        )
        or 0.0
    )


def user_messages(fake_openai: FakeOpenAI) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in fake_openai.chat_requests]


async def answered(fake_slack: FakeSlack, channel: str, thread: str, text: str) -> None:
    """Wait until the thread shows `text` as a finished reply."""
    await fake_slack.wait_until(
        lambda: any(m.text == text and not m.streaming for m in fake_slack.thread(channel, thread))
    )


async def test_mention_is_answered_in_its_thread_with_persona_and_cleaned_question(
    settings, fake_slack, fake_openai
):
    async with running_slack_app(settings()) as app:
        await app.send_event(mention("<@U0BOT>  how do I reset my password? ", ts="1700.000100"))
        await answered(fake_slack, "C0GENERAL", "1700.000100", "echo: how do I reset my password?")

        body = fake_openai.chat_requests[-1].body
        assert body["messages"] == [
            {"role": "system", "content": "You are the Slack test persona."},
            {"role": "user", "content": "how do I reset my password?"},
        ]
        # The working status went to that thread, then the answer was streamed there.
        assert [s["thread_ts"] for s in fake_slack.statuses] == ["1700.000100"]
        [reply] = fake_slack.thread("C0GENERAL", "1700.000100")
        assert reply.via == "stream"
        start = fake_slack.calls_to("chat.startStream")[0].body
        assert start["recipient_user_id"] == "U0ALICE" and start["recipient_team_id"] == "T0TEST"


async def test_a_mention_inside_a_thread_is_answered_in_that_thread(settings, fake_slack):
    async with running_slack_app(settings()) as app:
        await app.send_event(
            mention("<@U0BOT|supportbot> and this?", ts="1700.000300", thread_ts="1700.000200")
        )
        await answered(fake_slack, "C0GENERAL", "1700.000200", "echo: and this?")
        assert fake_slack.thread("C0GENERAL", "1700.000300") == []


async def test_without_streaming_a_placeholder_is_posted_then_updated(settings, fake_slack):
    fake_slack.streaming = "not_allowed"
    async with running_slack_app(settings()) as app:
        await app.send_event(mention("<@U0BOT> first", ts="1700.000400"))
        await answered(fake_slack, "C0GENERAL", "1700.000400", "echo: first")
        await app.send_event(mention("<@U0BOT> second", ts="1700.000500"))
        await answered(fake_slack, "C0GENERAL", "1700.000500", "echo: second")

    # The first answer learnt that streaming is refused; the second went straight to the
    # placeholder, which became the answer (one message per thread, no stray "…").
    assert len(fake_slack.calls_to("chat.startStream")) == 1
    assert fake_slack.texts("C0GENERAL", "1700.000400") == ["echo: first"]
    assert fake_slack.texts("C0GENERAL", "1700.000500") == ["echo: second"]
    posts = [c.body for c in fake_slack.calls_to("chat.postMessage")]
    assert [p["text"] for p in posts if p["thread_ts"] == "1700.000500"] == ["…"]


async def test_when_the_status_is_refused_the_placeholder_shows_work(settings, fake_slack):
    fake_slack.status_error = "missing_scope"
    async with running_slack_app(settings()) as app:
        await app.send_event(mention("<@U0BOT> hi", ts="1700.000600"))
        await answered(fake_slack, "C0GENERAL", "1700.000600", "echo: hi")
    posted = fake_slack.calls_to("chat.postMessage")
    assert posted[0].body["text"] == "…" and posted[0].body["thread_ts"] == "1700.000600"
    assert fake_slack.calls_to("chat.startStream") == []


async def test_a_direct_message_is_answered_without_a_mention(settings, fake_slack, fake_openai):
    async with running_slack_app(settings()) as app:
        await app.send_event(message("where is my order?", channel="D0ALICE", channel_type="im"))
        await answered(fake_slack, "D0ALICE", "1700000000.000002", "echo: where is my order?")


async def test_redelivery_is_answered_once(settings, fake_slack, fake_openai):
    before = duplicates()
    async with running_slack_app(settings()) as app:
        body = await app.send_event(mention("<@U0BOT> once please", ts="1700.000700"))
        await answered(fake_slack, "C0GENERAL", "1700.000700", "echo: once please")
        await app.redeliver(body, retry=1)
        await app.redeliver(body, retry=2)
        await app.settle(3)
    assert duplicates() == before + 2
    assert user_messages(fake_openai) == ["once please"]
    assert len(fake_slack.thread("C0GENERAL", "1700.000700")) == 1


async def test_a_message_sent_as_two_events_is_answered_once(settings, fake_slack, fake_openai):
    # In a DM a mention arrives both as message.im and as app_mention, with different event ids.
    async with running_slack_app(settings()) as app:
        dm = {"channel": "D0ALICE", "ts": "1700.000800"}
        await asyncio.gather(
            app.send_event(message("<@U0BOT> hello", channel_type="im", **dm)),
            app.send_event(mention("<@U0BOT> hello", channel_type="im", **dm)),
        )
        await app.settle(2)
    assert user_messages(fake_openai) == ["hello"]
    assert fake_slack.texts("D0ALICE", "1700.000800") == ["echo: hello"]


async def test_two_instances_on_one_redis_answer_once(settings, fake_slack, fake_openai):
    async with running_slack_app(settings()) as first, running_slack_app(settings()) as second:
        body = event_body(mention("<@U0BOT> shared", ts="1700.000900"))
        # Slack's retry reaches the other replica while the first is still answering.
        await asyncio.gather(
            first.post(json.dumps(body), content_type="application/json"),
            second.post(json.dumps(body), content_type="application/json", retry=1),
        )
        await first.settle(1)
        await second.settle(1)
    assert user_messages(fake_openai) == ["shared"]
    assert fake_slack.texts("C0GENERAL", "1700.000900") == ["echo: shared"]


async def test_a_retry_of_an_event_nobody_took_is_answered(settings, fake_slack, fake_openai):
    before = duplicates()
    async with running_slack_app(settings()) as app:
        # The first delivery never arrived: only Slack's retry does.
        await app.send_event(mention("<@U0BOT> lost first", ts="1700.001000"), retry=1)
        await answered(fake_slack, "C0GENERAL", "1700.001000", "echo: lost first")
    assert duplicates() == before


async def test_bots_itself_edits_and_deletes_are_ignored(settings, fake_slack, fake_openai):
    events = [
        mention("<@U0BOT> from a bot", bot_id="B0OTHER", ts="1700.1"),
        mention("<@U0BOT> bot profile", bot_profile={"id": "B0X"}, ts="1700.2"),
        message("<@U0BOT> a bot_message", subtype="bot_message", user=None, ts="1700.3"),
        message("my own reply", user="U0BOT", channel_type="im", channel="D0ALICE", ts="1700.4"),
        mention("<@U0BOT> edited", edited={"user": "U0ALICE", "ts": "1700.6"}, ts="1700.5"),
        message("", subtype="message_changed", user=None, channel_type="im", ts="1700.7"),
        message("", subtype="message_deleted", user=None, channel_type="im", ts="1700.8"),
        message("not for the bot", ts="1700.9"),
        message("a reply in a thread", thread_ts="1700.1", ts="1700.10"),
    ]
    async with running_slack_app(settings()) as app:
        calls_at_start = len(fake_slack.calls)
        for event in events:
            await app.send_event(event)
        # Bolt drops the bot's own message before any listener; ours see the rest.
        await app.settle(len(events) - 1)
        assert fake_slack.calls[calls_at_start:] == []
    assert fake_openai.chat_requests == []


async def test_thread_scope_follow_ups_continue_without_a_mention(
    settings, fake_slack, fake_openai
):
    async with running_slack_app(settings(history_scope="thread")) as app:
        await app.send_event(mention("<@U0BOT> my order is late", ts="1700.002000"))
        await answered(fake_slack, "C0GENERAL", "1700.002000", "echo: my order is late")
        await app.send_event(message("it was #42", thread_ts="1700.002000", ts="1700.002100"))
        await answered(fake_slack, "C0GENERAL", "1700.002000", "echo: it was #42")
        # A thread the bot never answered in stays a human conversation.
        await app.send_event(message("unrelated", thread_ts="1700.003000", ts="1700.003100"))
        await app.settle(3)

    follow_up = fake_openai.chat_requests[-1].body["messages"]
    assert [m["content"] for m in follow_up[1:]] == [
        "my order is late",
        "echo: my order is late",
        "it was #42",
    ]
    assert user_messages(fake_openai) == ["my order is late", "it was #42"]


@pytest.mark.parametrize("scope", ["channel", "thread"])
async def test_only_the_askers_follow_ups_are_answered_without_a_mention(
    settings, fake_slack, fake_openai, scope
):
    async with running_slack_app(settings(history_scope=scope)) as app:
        await app.send_event(mention("<@U0BOT> q1", ts="1700.004000"))
        await answered(fake_slack, "C0GENERAL", "1700.004000", "echo: q1")
        # Someone else's chatter in the bot's thread is theirs.
        await app.send_event(
            message("me too", thread_ts="1700.004000", ts="1700.004100", user="U0BOB")
        )
        await app.send_event(message("follow-up", thread_ts="1700.004000", ts="1700.004200"))
        await answered(fake_slack, "C0GENERAL", "1700.004000", "echo: follow-up")
        await app.settle(3)
    assert user_messages(fake_openai) == ["q1", "follow-up"]


async def test_no_follow_up_is_answered_in_a_handed_off_thread(settings, fake_slack, fake_openai):
    async with running_slack_app(settings()) as app:
        await app.send_event(mention("<@U0BOT> q1", ts="1700.004000"))
        await answered(fake_slack, "C0GENERAL", "1700.004000", "echo: q1")
        [answer] = fake_slack.thread("C0GENERAL", "1700.004000")
        answer_id = next(b for b in answer.blocks if b["type"] == "actions")["elements"][0]["value"]
        key = ConversationKey("slack", "T0TEST", "C0GENERAL", "1700.004000")
        assert await app.runtime.service.store.open_handoff(key, answer_id, "1700.004000")
        posted = len(fake_slack.calls_to("chat.postMessage", "chat.startStream"))
        await app.send_event(message("follow-up", thread_ts="1700.004000", ts="1700.004200"))
        await app.settle(2)
        # Silence: not even the note a mention gets; the human has the thread.
        assert len(fake_slack.calls_to("chat.postMessage", "chat.startStream")) == posted
    assert user_messages(fake_openai) == ["q1"]


async def test_channel_scope_shares_history_across_threads(settings, fake_slack, fake_openai):
    async with running_slack_app(settings()) as app:
        await app.send_event(mention("<@U0BOT> in thread one", ts="1700.005000"))
        await answered(fake_slack, "C0GENERAL", "1700.005000", "echo: in thread one")
        await app.send_event(mention("<@U0BOT> in thread two", ts="1700.006000"))
        await answered(fake_slack, "C0GENERAL", "1700.006000", "echo: in thread two")
    contents = [m["content"] for m in fake_openai.chat_requests[-1].body["messages"]]
    assert "in thread one" in contents


async def test_bad_signature_gets_401_and_nothing_else(settings, fake_slack, fake_openai):
    async with running_slack_app(settings()) as app:
        calls_at_start = len(fake_slack.calls)
        body = json.dumps(event_body(mention("<@U0BOT> forged", ts="1700.007000")))
        status, _ = await app.post(body, content_type="application/json", secret="wrong-secret")
        assert status == 401
        stale = {"X-Slack-Request-Timestamp": "1000000000", "Content-Type": "application/json"}
        async with app.session.post(f"{app.url}/slack/events", data=body, headers=stale) as r:
            assert r.status == 401
        await asyncio.sleep(0.2)  # would be ample for a (wrongly) started answer to call out
        assert app.bot.received == 0
        assert fake_slack.calls[calls_at_start:] == []
    assert fake_openai.chat_requests == []


async def test_url_verification_and_ssl_check(settings):
    async with running_slack_app(settings()) as app:
        challenge = json.dumps({"token": "t", "challenge": "c-123", "type": "url_verification"})
        status, text = await app.post(challenge, content_type="application/json")
        assert (status, json.loads(text)) == (200, {"challenge": "c-123"})
        status, _ = await app.post(
            "ssl_check=1&token=t", content_type="application/x-www-form-urlencoded"
        )
        assert status == 200


async def test_ten_mentions_in_three_channels_at_once_each_answered_once(
    settings, fake_slack, fake_openai
):
    fake_openai.answer(None, chunk_delay_s=0.01)
    questions = [(f"C0CHAN{i % 3}", f"1700.{100 + i:06d}", f"question {i}") for i in range(10)]
    async with running_slack_app(settings()) as app:
        await asyncio.gather(
            *(
                app.send_event(mention(f"<@U0BOT> {text}", channel=channel, ts=ts))
                for channel, ts, text in questions
            )
        )
        await app.settle(10)
    for channel, ts, text in questions:
        assert fake_slack.texts(channel, ts) == [f"echo: {text}"]
    assert sorted(user_messages(fake_openai)) == sorted(text for _, _, text in questions)


async def test_logs_never_show_the_token_the_signing_secret_or_the_openai_key(
    settings, fake_slack, fake_openai, caplog
):
    caplog.set_level(logging.DEBUG)
    config = settings()
    async with running_slack_app(config) as app:
        await app.send_event(mention("<@U0BOT> hello", ts="1700.008000"))
        await answered(fake_slack, "C0GENERAL", "1700.008000", "echo: hello")
        fake_openai.fail(401, times=3)
        await app.send_event(mention("<@U0BOT> again", ts="1700.009000"))
        await fake_slack.wait_until(
            lambda: "error id" in "".join(fake_slack.texts("C0GENERAL", "1700.009000"))
        )
        await app.post("{}", content_type="application/json", secret="wrong-secret")
    assert config.openai_api_key is not None
    logs = caplog.text
    assert "Sending a request" in logs  # slack_sdk's debug logging was on, so this means something
    for secret in (BOT_TOKEN, SIGNING_SECRET, config.openai_api_key.get_secret_value()):
        assert secret not in logs


async def test_two_mentions_in_a_channel_are_answered_in_arrival_order_whatever_their_claims(
    settings, fake_slack, monkeypatch
):
    """B8: the exactly-once claim runs under the conversation's lock, so a slow claim for the
    first mention cannot let the second one take the channel's turn first."""
    async with running_slack_app(settings()) as app:
        claim = app.runtime.store.claim

        async def claim_first_slowly(platform: str, *ids: str, **kw: Any) -> str | None:
            if "C0GENERAL:1700.010100" in ids:
                await asyncio.sleep(0.3)  # its round trip completes after the second mention's
            return await claim(platform, *ids, **kw)

        monkeypatch.setattr(app.runtime.store, "claim", claim_first_slowly)
        await app.send_event(mention("<@U0BOT> first", ts="1700.010100"))
        await app.send_event(mention("<@U0BOT> second", ts="1700.010200"))
        await app.settle(2)

        stored = await app.runtime.store.history(ConversationKey("slack", TEAM, "C0GENERAL"))
    assert [m.content for m in stored] == ["first", "echo: first", "second", "echo: second"]
    assert fake_slack.texts("C0GENERAL", "1700.010100") == ["echo: first"]
    assert fake_slack.texts("C0GENERAL", "1700.010200") == ["echo: second"]


async def test_the_error_line_of_an_undeliverable_answer_has_the_answers_error_id(
    settings, fake_slack, fake_openai, caplog
):
    """B8: the model fails, so the answer is an error message with an id; Slack then refuses
    every way of showing it. The line that says so carries the same id (the answer's correlation
    id), so the operator finds the message, the failure and the delivery problem under one id."""
    caplog.handler.addFilter(RedactingFilter())  # stamps each record with its correlation id
    fake_openai.fail(500, times=5)
    fake_slack.streaming = "not_in_channel"
    fake_slack.fail("chat.postMessage", "not_in_channel", times=2)  # the post, then once more
    async with running_slack_app(settings()) as app:
        await app.send_event(mention("<@U0BOT> hello", ts="1700.011100"))
        await app.settle(1)

    assert fake_slack.thread("C0GENERAL", "1700.011100") == []  # nothing got through
    meant = fake_slack.calls_to("chat.postMessage")[-1].body["text"]
    found = re.search(r"error id: (\w+)", meant)
    assert found, meant
    error_id = found.group(1)
    undelivered = [r for r in caplog.records if "could not deliver" in r.getMessage()]
    assert undelivered and all(f"[error_id={error_id}]" in r.getMessage() for r in undelivered), [
        r.getMessage() for r in undelivered
    ]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert {getattr(r, "correlation_id", None) for r in errors} == {error_id}
