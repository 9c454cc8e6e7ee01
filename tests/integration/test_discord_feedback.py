"""👍/👎 in Discord under SimCord: buttons on the final answer, component interactions through
the real discord.py client, the vote stored with the answer (the latest counts), an ephemeral
thank-you only; a vote for an answer no longer stored changes nothing and says so."""

from __future__ import annotations

from typing import Any

import pytest

from bot.platforms.discord.feedback import PREFIX
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
    assert [i.rsplit(":", 1)[0] for i in ids] == [f"{PREFIX}up", f"{PREFIX}down"]
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
