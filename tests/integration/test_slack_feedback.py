"""👍/👎 in Slack: the buttons on the final answer, signed `block_actions` through bolt, the vote
stored with the answer (a user's latest vote counts), an ephemeral thank-you and never a channel
message; a vote for an answer that is no longer stored changes nothing and says so."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bot.conversation import ConversationKey
from bot.handoff import HANDED_OFF_NOTE, HANDOFF_GONE
from bot.ops import metrics
from bot.platforms.slack.feedback import HANDOFF, RESOLVED, VOTE_DOWN, VOTE_UP
from bot.service import VOTE_GONE, VOTE_THANKS
from bot.store import answer_key, votes_key
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import FakeSlack, mention, running_slack_app, slack_settings

pytestmark = pytest.mark.usefixtures("redis")

THREAD = "1700.000100"


def counted(name: str, **labels: str) -> float:
    """A /metrics counter's value (the registry is process-wide: tests compare differences)."""
    return metrics.REGISTRY.get_sample_value(f"supportbot_{name}_total", labels) or 0.0


CHANNEL = ConversationKey("slack", "T0TEST", "C0GENERAL")


@pytest.fixture
def settings(fake_slack: FakeSlack, fake_openai: FakeOpenAI, redis_server):
    return slack_settings(fake_slack, redis_url=redis_server.url, openai_url=fake_openai.base_url)


def controls_of(fake_slack: FakeSlack) -> tuple[str, list[dict[str, Any]]]:
    """The final answer's text and the buttons on it."""
    (answer,) = fake_slack.thread("C0GENERAL", THREAD)
    actions = [b for b in answer.blocks if b["type"] == "actions"]
    assert len(actions) == 1, answer.blocks
    return answer.text, actions[0]["elements"]


async def vote(app, fake_slack: FakeSlack, action_id: str, answer_id: str, user="U0ALICE"):
    seen = len(fake_slack.responses)
    began = time.monotonic()
    status, body = await app.press(
        action_id, answer_id, response_url=fake_slack.response_url("vote"), user=user
    )
    assert (status, body) == (200, "")
    assert time.monotonic() - began < 3  # acknowledged within Slack's 3 s
    await fake_slack.wait_until(lambda: len(fake_slack.responses) > seen)
    reply = fake_slack.responses[seen]
    assert reply["response_type"] == "ephemeral"
    assert reply.get("replace_original") is False  # the answer stays as it was
    return reply["text"]


@pytest.mark.parametrize("streaming", [True, "not_allowed"], ids=["stream", "update"])
async def test_votes_are_stored_with_the_answer_and_the_latest_counts(
    settings, fake_slack, fake_openai, redis, streaming
):
    fake_slack.streaming = streaming
    fake_openai.answer(chunks=["The answer ", "is 42."])
    async with running_slack_app(settings) as app:
        await app.send_event(mention("<@U0BOT> what is it?", ts=THREAD))
        await app.settle(1)
        text, buttons = controls_of(fake_slack)
        assert text.startswith("The answer is 42.")
        assert [b["action_id"] for b in buttons] == [VOTE_UP, VOTE_DOWN, HANDOFF]
        answer_id = buttons[0]["value"]
        assert buttons[1]["value"] == buttons[2]["value"] == answer_id
        record = await redis.hgetall(answer_key(CHANNEL, answer_id))
        assert record[b"question"] == b"what is it?"
        assert record[b"asker"] == b"U0ALICE"
        assert record[b"backend"].startswith(b"openai:")

        posted = len(fake_slack.calls_to("chat.postMessage", "chat.postEphemeral"))
        ups, downs = (
            counted("votes", platform="slack", vote="up"),
            counted("votes", platform="slack", vote="down"),
        )
        assert await vote(app, fake_slack, VOTE_UP, answer_id) == VOTE_THANKS
        assert await vote(app, fake_slack, VOTE_DOWN, answer_id, user="U0BOB") == VOTE_THANKS
        assert await vote(app, fake_slack, VOTE_DOWN, answer_id) == VOTE_THANKS  # changed
        store = app.runtime.service.store
        assert await store.votes(CHANNEL, answer_id) == {"U0ALICE": "down", "U0BOB": "down"}
        # /metrics counts presses (the report, the latest vote of each user).
        assert counted("votes", platform="slack", vote="up") == ups + 1
        assert counted("votes", platform="slack", vote="down") == downs + 2
        # Votes post nothing into the channel.
        assert len(fake_slack.calls_to("chat.postMessage", "chat.postEphemeral")) == posted
        assert await redis.ttl(votes_key(CHANNEL, answer_id)) > 0  # bounded like the answer


async def test_a_vote_for_an_answer_no_longer_stored_changes_nothing(
    settings, fake_slack, fake_openai, redis
):
    fake_openai.answer(chunks=["Sure."])
    async with running_slack_app(settings) as app:
        await app.send_event(mention("<@U0BOT> hi", ts=THREAD))
        await app.settle(1)
        _, buttons = controls_of(fake_slack)
        answer_id = buttons[0]["value"]
        await redis.delete(answer_key(CHANNEL, answer_id))  # expired
        before = sorted(await redis.keys("*"))
        assert await vote(app, fake_slack, VOTE_UP, answer_id) == VOTE_GONE
        assert await vote(app, fake_slack, VOTE_UP, "0123456789abcdef") == VOTE_GONE
        assert sorted(await redis.keys("*")) == before


async def test_a_failed_answer_has_no_vote_buttons(settings, fake_slack, fake_openai):
    fake_openai.fail(status=400, times=5)
    async with running_slack_app(settings) as app:
        await app.send_event(mention("<@U0BOT> hi", ts=THREAD))
        await app.settle(1)
    assert all(not m.blocks for m in fake_slack.thread("C0GENERAL", THREAD))


# -- "Ask a human" ----------------------------------------------------------------------------


async def press(app, fake_slack: FakeSlack, action_id: str, value: str, *, replace=False):
    seen = len(fake_slack.responses)
    status, _ = await app.press(
        action_id, value, response_url=fake_slack.response_url("x"), user="U0ALICE",
        thread_ts=THREAD,
    )  # fmt: skip
    assert status == 200
    await fake_slack.wait_until(lambda: len(fake_slack.responses) > seen)
    reply = fake_slack.responses[seen]
    assert reply.get("replace_original") is replace
    return reply


async def test_ask_a_human_hands_off_with_a_summary_until_resolved(
    fake_slack, fake_openai, redis_server
):
    settings = slack_settings(
        fake_slack, redis_url=redis_server.url, openai_url=fake_openai.base_url,
        slack_handoff_to="U0LEAD, S0TEAM",
    )  # fmt: skip
    fake_openai.answer("Try the reset link.")
    async with running_slack_app(settings) as app:
        await app.send_event(mention("<@U0BOT> how do I reset my password?", ts=THREAD))
        await app.settle(1)
        _, buttons = controls_of(fake_slack)
        fake_openai.answer("Alice cannot reset her password; the reset link was suggested.")
        handoffs = counted("handoffs", platform="slack")
        reply = await press(app, fake_slack, HANDOFF, buttons[2]["value"])
        assert counted("handoffs", platform="slack") == handoffs + 1
        assert reply["response_type"] == "ephemeral"
        handoff = fake_slack.thread("C0GENERAL", THREAD)[-1]
        assert handoff.text.startswith("<@U0LEAD> <!subteam^S0TEAM> <@U0ALICE> asked for a human")
        assert "*Question:* how do I reset my password?" in handoff.text
        assert "*Summary:* Alice cannot reset her password" in handoff.text
        [resolved] = next(b for b in handoff.blocks if b["type"] == "actions")["elements"]
        assert (resolved["action_id"], resolved["value"]) == (RESOLVED, THREAD)

        # Handed off: a mention there gets one short note, and no model is asked.
        asked = len(fake_openai.chat_requests)
        await app.send_event(mention("<@U0BOT> hello?", ts="1700.000200", thread_ts=THREAD))
        await app.settle(2)
        assert fake_slack.texts("C0GENERAL", THREAD)[-1] == HANDED_OFF_NOTE
        assert len(fake_openai.chat_requests) == asked
        assert [m.content for m in await app.runtime.service.store.history(CHANNEL)][-1] != (
            "hello?"
        )

        # Resolved: the hand-off message says who resolved it, and the bot answers again.
        done = await press(app, fake_slack, RESOLVED, THREAD, replace=True)
        assert done["text"].startswith("✅ Resolved by <@U0ALICE>")
        fake_openai.answer("Back again.")
        await app.send_event(mention("<@U0BOT> still there?", ts="1700.000300", thread_ts=THREAD))
        await app.settle(3)
        assert fake_slack.texts("C0GENERAL", THREAD)[-1].startswith("Back again.")


async def test_a_hand_off_goes_out_without_a_summary_when_no_model_answers(
    settings, fake_slack, fake_openai
):
    fake_openai.answer("An answer.")
    async with running_slack_app(settings) as app:
        await app.send_event(mention("<@U0BOT> help", ts=THREAD))
        await app.settle(1)
        _, buttons = controls_of(fake_slack)
        fake_openai.fail(status=500, times=10)
        await press(app, fake_slack, HANDOFF, buttons[2]["value"])
        handoff = fake_slack.thread("C0GENERAL", THREAD)[-1]
    assert handoff.text.startswith("<@U0ALICE> asked for a human")  # SLACK_HANDOFF_TO unset
    assert "*Question:* help" in handoff.text and "No summary" in handoff.text


async def test_a_hand_off_from_an_answer_no_longer_stored_changes_nothing(
    settings, fake_slack, fake_openai, redis
):
    fake_openai.answer("An answer.")
    async with running_slack_app(settings) as app:
        await app.send_event(mention("<@U0BOT> help", ts=THREAD))
        await app.settle(1)
        _, buttons = controls_of(fake_slack)
        await redis.delete(answer_key(CHANNEL, buttons[2]["value"]))
        before = sorted(await redis.keys("*"))
        posted = len(fake_slack.calls_to("chat.postMessage"))
        reply = await press(app, fake_slack, HANDOFF, buttons[2]["value"])
        assert reply["text"] == HANDOFF_GONE
        assert sorted(await redis.keys("*")) == before
        assert len(fake_slack.calls_to("chat.postMessage")) == posted
