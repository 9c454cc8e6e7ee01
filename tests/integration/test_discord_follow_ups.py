"""Discord follow-ups without a mention: in a thread, or as a reply to the bot's message, the
person the bot last answered there is answered; anyone else's chatter is not, and a handed-off
channel gets no answer at all."""

from __future__ import annotations

from typing import Any

import pytest

from bot.service import SupportService
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


def custom_ids(message: Any) -> list[str]:
    return [c.custom_id for row in message.components for c in row.children if c.custom_id]


async def test_in_a_thread_only_the_askers_follow_ups_are_answered(
    world: World, service: SupportService
) -> None:
    thread = world.thread("order 42")
    bob = world.guild.add_member(world.env.create_user("bob"))
    await world.alice.send(thread, world.mention("my order is late"))
    await bob.send(thread, "me too")  # someone else's chatter
    await world.alice.send(thread, "it was #42")
    assert [m.content for m in world.answers(thread)] == [
        "echo: my order is late",
        "echo: it was #42",
    ]


async def test_a_reply_to_the_bots_answer_is_a_follow_up_a_plain_message_is_not(
    world: World, service: SupportService
) -> None:
    await world.alice.send(world.channel, world.mention("first"))
    (answer,) = world.answers()
    await world.alice.send(world.channel, "not for the bot")
    await world.alice.send(world.channel, "and then?", reply_to=answer)
    assert [m.content for m in world.answers()] == ["echo: first", "echo: and then?"]


async def test_no_follow_up_is_answered_in_a_handed_off_thread(
    world: World, service: SupportService, scripted: ScriptedLLM
) -> None:
    thread = world.thread("handed off")
    await world.alice.send(thread, world.mention("help"))
    (answer,) = world.answers(thread)
    handoff_id = next(i for i in custom_ids(answer) if i.startswith("sb:handoff:"))
    await world.alice.click(answer, custom_id=handoff_id)
    calls, shown = len(scripted.calls), len(world.answers(thread))
    await world.alice.send(thread, "anyone?")
    assert len(world.answers(thread)) == shown  # the hand-off message was the last word
    assert len(scripted.calls) == calls
