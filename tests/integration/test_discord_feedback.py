"""👍/👎 in Discord under SimCord: buttons on the final answer, component interactions through
the real discord.py client, the vote stored with the answer (the latest counts), an ephemeral
thank-you only; a vote for an answer no longer stored changes nothing and says so."""

from __future__ import annotations

from typing import Any

import pytest

from bot.handoff import HANDED_OFF_NOTE, HANDOFF_GONE
from bot.platforms.discord.feedback import HANDOFF_PREFIX, PREFIX, RESOLVED_PREFIX
from bot.service import VOTE_GONE, VOTE_THANKS, SupportService
from bot.store import answer_key
from tests.conftest import make_service
from tests.fixtures.discord_sim import (  # noqa: F401 - fixtures, found by pytest by name
    World,
    simcord_bot_fixture,
    world_fixture,
)
from tests.support.backends import ScriptedLLM


@pytest.fixture
async def service(redis: Any, scripted: ScriptedLLM) -> SupportService:
    svc = make_service(redis, scripted)
    await svc.llm.start()
    return svc


def buttons(message: Any) -> list[str]:
    return [
        child.custom_id for row in message.components for child in row.children if child.custom_id
    ]


async def test_votes_through_buttons_are_stored_and_thanked_privately(
    world: World, service: SupportService, redis: Any
) -> None:
    bob = world.guild.add_member(world.env.create_user("bob"))
    await world.alice.send(world.channel, world.mention("How do I reset my password?"))
    (answer,) = world.answers()
    ids = buttons(answer)
    assert [i.rsplit(":", 1)[0] for i in ids] == [f"{PREFIX}up", f"{PREFIX}down", "sb:handoff"]
    answer_id = ids[0].rsplit(":", 1)[1]
    assert await redis.exists(answer_key(world.key(), answer_id))

    up = await world.alice.click(answer, custom_id=ids[0])
    assert up.response is not None and up.response.ephemeral
    assert up.response.content == VOTE_THANKS
    await bob.click(answer, custom_id=ids[1])
    await world.alice.click(answer, custom_id=ids[1])  # changes her vote
    votes = await service.store.votes(world.key(), answer_id)
    assert votes == {world.alice.mention: "down", bob.mention: "down"}
    assert len(world.answers()) == 1  # nothing was posted in the channel


async def test_a_vote_for_a_forgotten_answer_changes_nothing(
    world: World, service: SupportService, redis: Any
) -> None:
    await world.alice.send(world.channel, world.mention("hi"))
    (answer,) = world.answers()
    ids = buttons(answer)
    await redis.delete(answer_key(world.key(), ids[0].rsplit(":", 1)[1]))
    before = sorted(await redis.keys("*"))
    result = await world.alice.click(answer, custom_id=ids[0])
    assert result.response is not None and result.response.ephemeral
    assert result.response.content == VOTE_GONE
    assert sorted(await redis.keys("*")) == before
    assert len(world.answers()) == 1


# -- "Ask a human" ----------------------------------------------------------------------------


async def test_ask_a_human_mentions_the_role_with_a_summary_until_resolved(
    world: World, service: SupportService, scripted: ScriptedLLM
) -> None:
    role = world.guild.create_role("Support")
    world.bot.handoff_role = str(role.id)
    await world.alice.send(world.channel, world.mention("Where is my order?"))
    (answer,) = world.answers()
    handoff_id = buttons(answer)[2]
    assert handoff_id.startswith(HANDOFF_PREFIX)

    result = await world.alice.click(answer, custom_id=handoff_id)
    # Deferred first (the summary takes a model's time), then answered for the presser only.
    assert result.response is not None and result.response.ephemeral
    assert result.response.content == "I've asked a human to take over this conversation."
    handoff = world.answers()[-1]
    assert handoff.content.startswith(f"<@&{role.id}> {world.alice.mention} asked for a human")
    assert "**Question:** Where is my order?" in handoff.content
    assert "**Summary:** echo: " in handoff.content  # the scripted model's summary
    assert buttons(handoff) == [f"{RESOLVED_PREFIX}{world.channel.id}"]

    # Handed off: a mention gets one short note and no model is asked.
    calls = len(scripted.calls)
    await world.alice.send(world.channel, world.mention("Hello?"))
    assert world.answers()[-1].content == HANDED_OFF_NOTE
    assert len(scripted.calls) == calls

    await world.alice.click(handoff, custom_id=buttons(handoff)[0])
    resolved = next(m for m in world.answers() if m.id == handoff.id)
    assert resolved.content.startswith(f"✅ Resolved by {world.alice.mention}")
    assert not resolved.components
    await world.alice.send(world.channel, world.mention("Still there?"))
    assert world.answers()[-1].content == "echo: Still there?"


async def test_a_hand_off_from_a_forgotten_answer_changes_nothing(
    world: World, service: SupportService, redis: Any
) -> None:
    await world.alice.send(world.channel, world.mention("hi"))
    (answer,) = world.answers()
    handoff_id = buttons(answer)[2]
    await redis.delete(answer_key(world.key(), handoff_id.removeprefix(HANDOFF_PREFIX)))
    before = sorted(await redis.keys("*"))
    result = await world.alice.click(answer, custom_id=handoff_id)
    assert result.response is not None and result.response.ephemeral
    assert result.response.content == HANDOFF_GONE
    assert sorted(await redis.keys("*")) == before
    assert len(world.answers()) == 1
