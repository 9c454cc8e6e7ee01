"""Discord on SIGTERM: an answer still running after SHUTDOWN_GRACE_SECONDS is cut, and its
message is edited a last time with the text so far and a notice (not left half-written)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from bot.llm.base import Delta, Prompt, StreamEvent
from bot.platforms.frontdoor import CUT_WRITE_S
from bot.sampling import SamplingSettings
from bot.service import SupportService
from tests.conftest import make_service
from tests.fixtures.discord_sim import (  # noqa: F401 - fixtures, found by pytest by name
    World,
    simcord_bot_fixture,
    world_fixture,
)
from tests.support.backends import ScriptedLLM

LONG = " ".join(f"w{i}" for i in range(200))


@dataclass
class Slow(ScriptedLLM):
    """A model that takes about 15 s for its answer."""

    delay_s: float = 0.05
    on_chunk: Callable[[int], None] = lambda _: None  # told the number of each chunk sent

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        sent = 0
        async for event in super().stream(prompt, sampling):
            yield event
            if isinstance(event, Delta):
                sent += 1
                self.on_chunk(sent)
                await asyncio.sleep(self.delay_s)


@pytest.fixture
def scripted() -> ScriptedLLM:
    return Slow(answer=lambda _: LONG)


@pytest.fixture
async def service(redis: Any, scripted: ScriptedLLM) -> SupportService:
    svc = make_service(redis, scripted)
    await svc.llm.start()
    return svc


async def test_an_answer_past_the_grace_period_ends_with_a_notice(
    world: World, scripted: Slow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    took: list[float] = []

    async def sigterm() -> None:
        started = time.monotonic()
        await world.bot.drain(grace_s=0.5)  # what SIGTERM does with SHUTDOWN_GRACE_SECONDS=0.5
        took.append(time.monotonic() - started)

    stopping: list[asyncio.Task[None]] = []

    def on_chunk(sent: int) -> None:
        if sent == 20:  # mid-answer, SIGTERM arrives
            stopping.append(asyncio.create_task(sigterm()))

    scripted.on_chunk = on_chunk
    await world.alice.send(world.channel, world.mention("tell me everything"))
    await asyncio.gather(*stopping)

    assert 0.5 <= took[0] < 0.5 + CUT_WRITE_S
    [answer] = world.answers()
    assert answer.content.startswith("w0 w1 w2")
    assert "w199" not in answer.content  # cut...
    assert "restarted before I could finish this answer" in answer.content  # ...and said so
    [cut] = [r.getMessage() for r in caplog.records if "cut by shutdown" in r.getMessage()]
    assert f"discord:{world.guild.id}:{world.channel.id}" in cut
