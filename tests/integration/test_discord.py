"""The Discord bot under SimCord: the real discord.py client against an in-memory Discord, the
SupportService over a real redis-server, and our own instant (or trickling) backends.

SimCord settles the loop after every actor verb, so when `send` returns the answer has been
streamed, edited and stored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import discord
import pytest

from bot.conversation import ConversationKey, Message
from bot.llm.base import BackendFailed, Delta, Prompt, StreamEvent
from bot.platforms.discord.sink import displayable, retry_delay
from bot.platforms.text import split_message
from bot.sampling import SamplingSettings
from bot.service import SupportService
from tests.conftest import DEFAULTS, make_service
from tests.fixtures.discord_sim import (  # noqa: F401 - fixtures, found by pytest by name
    INTERVAL,
    World,
    admin,
    simcord_bot_fixture,
    world_fixture,
)
from tests.support.backends import ScriptedLLM


@dataclass
class Trickle(ScriptedLLM):
    """Streams like a model: one small chunk every `delay_s` seconds."""

    delay_s: float = 0.03

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        async for event in super().stream(prompt, sampling):
            yield event
            if isinstance(event, Delta):
                await asyncio.sleep(self.delay_s)


@pytest.fixture
async def service(redis: Any, scripted: ScriptedLLM) -> SupportService:
    svc = make_service(redis, scripted)
    await svc.llm.start()
    return svc


def fences(text: str) -> int:
    return len(re.findall(r"^\s*```", text, flags=re.MULTILINE))


# -- mentions ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["<@{id}>", "<@!{id}>"])
async def test_a_mention_is_answered_as_a_reply_without_the_mention(
    world: World, scripted: ScriptedLLM, service: SupportService, form: str
) -> None:
    mention = form.format(id=world.bot_id)
    asked = await world.alice.send(world.channel, f"{mention} How do I reset my password?")

    (answer,) = world.answers()
    assert answer.content == "echo: How do I reset my password?"
    assert answer.reference is not None and answer.reference.message_id == asked.id
    assert scripted.calls[-1].messages[-1] == {
        "role": "user",
        "content": "How do I reset my password?",
    }
    assert await service.store.history(world.key()) == [
        Message("user", "How do I reset my password?"),
        Message("assistant", "echo: How do I reset my password?"),
    ]
    # The typing indicator came first, while the model worked.
    requests = [(r.method, r.path) for r in world.env.http_requests]
    typing = requests.index(("POST", f"/channels/{world.channel.id}/typing"))
    posted = requests.index(("POST", f"/channels/{world.channel.id}/messages"))
    assert typing < posted


async def test_a_direct_message_is_answered_without_a_mention(
    world: World, service: SupportService
) -> None:
    dave = world.env.create_user("dave")
    await dave.send_dm("Is the API down?")

    (answer,) = [m for m in dave.dm_channel.history() if m.author.id == world.bot_id]
    assert answer.content == "echo: Is the API down?"
    key = ConversationKey("discord", "dm", str(dave.dm_channel.id))
    assert [m.content for m in await service.store.history(key)] == [
        "Is the API down?",
        "echo: Is the API down?",
    ]


async def test_messages_without_a_mention_and_from_bots_are_not_answered(
    world: World, scripted: ScriptedLLM
) -> None:
    robot = world.guild.add_member(world.env.create_user("robot", bot=True))
    hook = world.guild.create_webhook(world.channel)

    await world.alice.send(world.channel, "just chatting, no mention")
    await world.alice.send(world.channel, "@everyone standup in 5")
    await robot.send(world.channel, world.mention("answer me, fellow bot"))
    await hook.send(world.mention("a webhook asking"))

    assert scripted.calls == [] and world.answers() == []


async def test_the_bot_does_not_answer_its_own_reply_even_when_it_mentions_itself(
    world: World, scripted: ScriptedLLM
) -> None:
    scripted.answer = lambda messages: f"<@{world.bot_id}> is here to help."
    await world.alice.send(world.channel, world.mention("who are you?"))

    assert len(scripted.calls) == 1
    assert [m.content for m in world.answers()] == [f"<@{world.bot_id}> is here to help."]


async def test_a_redelivered_message_is_answered_once(
    world: World, scripted: ScriptedLLM, redis: Any
) -> None:
    asked = await world.alice.send(world.channel, world.mention("hello"))
    # The same message again, as a resumed session or an overlapping replica would see it.
    await world.bot.on_message(asked)
    await world.env.settle()

    assert len(scripted.calls) == 1 and len(world.answers()) == 1
    assert await redis.exists(f"sb:event:discord:{world.bot_id}:{asked.id}")


async def test_each_channel_and_each_thread_has_its_own_history(
    world: World, scripted: ScriptedLLM, service: SupportService
) -> None:
    other = world.guild.create_text_channel("random")
    thread = world.thread("login trouble")

    await world.alice.send(world.channel, world.mention("one in support"))
    await world.alice.send(other, world.mention("one in random"))
    await world.alice.send(thread, world.mention("one in thread"))
    await world.alice.send(world.channel, world.mention("two in support"))
    in_support = [m["content"] for m in scripted.calls[-1].messages]
    await world.alice.send(thread, world.mention("two in thread"))
    in_thread = [m["content"] for m in scripted.calls[-1].messages]

    assert in_support[1:] == ["one in support", "echo: one in support", "two in support"]
    assert in_thread[1:] == ["one in thread", "echo: one in thread", "two in thread"]
    assert [m.content for m in await service.store.history(world.key(other))] == [
        "one in random",
        "echo: one in random",
    ]
    assert [m.content for m in world.answers(thread)] == [
        "echo: one in thread",
        "echo: two in thread",
    ]


# -- streaming -----------------------------------------------------------------------------

CODE = (
    "```python\n"
    + "".join(
        f"def handler_{i}(event):\n    return process(event, retries={i})\n" for i in range(30)
    )
    + "```"
)
PROSE = [f"Paragraph {i}. " + "The quick brown fox jumps over the lazy dog. " * 8 for i in range(7)]
LONG = "\n\n".join([*PROSE[:2], "Here is the handler module:", CODE, *PROSE[2:]])


@pytest.mark.parametrize("scripted", [ScriptedLLM(answer=lambda _: LONG, chunk_size=40)])
async def test_a_long_answer_with_code_is_split_into_messages_at_safe_boundaries(
    world: World,
) -> None:
    assert 4300 <= len(LONG) <= 4700
    assert LONG.index("```") < 2000 < LONG.rindex("```")  # a blind cut would land in the code

    await world.alice.send(world.channel, world.mention("show me the handlers"))

    contents = [m.content for m in world.answers()]
    assert contents == split_message(LONG, 2000)
    assert len(contents) == 3 and all(len(c) <= 2000 for c in contents)
    assert all(fences(c) % 2 == 0 for c in contents)
    assert sum(CODE in c for c in contents) == 1  # the block is whole, in one message
    first, *rest = world.answers()
    assert first.reference is not None and all(m.reference is None for m in rest)


@pytest.mark.parametrize("scripted", [Trickle(answer=lambda _: "word " * 30, chunk_size=5)])
async def test_edits_are_throttled_per_channel(world: World, scripted: ScriptedLLM) -> None:
    # 30 chunks, one every 30 ms: 0.9 s of streaming (SimCord's clock); a write every 0.1 s.
    await world.alice.send(world.channel, world.mention("stream please"))

    (answer,) = world.answers()
    assert answer.content == ("word " * 30).strip()
    edits = world.writes("PATCH")
    assert 3 <= len(edits) <= 0.9 / INTERVAL + 2  # it streamed, with far fewer than 30 edits
    # Live edits only grow; the last edit adds the 👍/👎 buttons (the text may be unchanged).
    assert edits[-1].json.get("components")
    shown = [e.json["content"] for e in edits[:-1]]
    assert all(len(a) < len(b) for a, b in itertools.pairwise(shown))


@pytest.mark.parametrize("status", [429, 500, 503])
@pytest.mark.parametrize("scripted", [Trickle(answer=lambda _: "word " * 12, chunk_size=5)])
async def test_rate_limits_and_server_errors_while_editing_still_end_with_the_full_text(
    world: World, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    world.env.inject_error("PATCH", "/channels/*/messages/*", status=status, times=3)
    with caplog.at_level(logging.WARNING):
        await world.alice.send(world.channel, world.mention("stream through errors"))

    assert [m.content for m in world.answers()] == [("word " * 12).strip()]
    assert f"HTTP {status}" in caplog.text


@pytest.mark.parametrize("status", [429, 502])
async def test_the_final_edit_is_retried_until_delivered(
    world: World, scripted: ScriptedLLM, status: int
) -> None:
    scripted.answer = lambda _: "a complete answer that arrives in several chunks"
    # Every edit fails three times, the last (final) one included; the fourth try lands.
    world.env.inject_error("PATCH", "/channels/*/messages/*", status=status, times=3)
    await world.alice.send(world.channel, world.mention("go"))

    assert [m.content for m in world.answers()] == [
        "a complete answer that arrives in several chunks"
    ]
    assert len(world.writes("PATCH")) >= 4 and len(world.writes("POST")) == 1


# -- shutdown ------------------------------------------------------------------------------


async def test_a_shutdown_during_the_claim_waits_for_that_answer(
    world: World, service: SupportService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B7: an answer counts as in progress from its first moment, its claim included, so the
    drain (SIGTERM) waits for it before the runtime (the store, the models) is closed."""
    claim = service.store.claim
    drained: list[list[str]] = []  # what the channel showed when the drain returned

    async def stop_now() -> None:
        await world.bot.drain(grace_s=30)
        drained.append([m.content for m in world.answers()])

    async def slow_claim(platform: str, *ids: str, **kw: Any) -> str | None:
        stopping.append(asyncio.create_task(stop_now()))  # SIGTERM arrives mid-claim...
        await asyncio.sleep(0.5)  # ...while the claim's round trip is slow
        return await claim(platform, *ids, **kw)

    stopping: list[asyncio.Task[None]] = []
    monkeypatch.setattr(service.store, "claim", slow_claim)
    await world.alice.send(world.channel, world.mention("are you there?"))
    await asyncio.gather(*stopping)

    assert drained == [["echo: are you there?"]]  # the drain waited for the whole answer
    assert [m.content for m in await service.store.history(world.key())] == [
        "are you there?",
        "echo: are you there?",
    ]
    # Taking no more questions after that.
    await world.alice.send(world.channel, world.mention("still there?"))
    assert len(world.answers()) == 1


# -- failures users see --------------------------------------------------------------------


@pytest.mark.parametrize(
    "scripted", [ScriptedLLM(raise_error=BackendFailed("CUDA out of memory at 0xdeadbeef"))]
)
async def test_a_failure_is_shown_with_an_error_id_and_no_raw_exception(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        await world.alice.send(world.channel, world.mention("help?"))

    (answer,) = world.answers()
    assert "the model failed while answering" in answer.content
    assert "CUDA" not in answer.content and "Traceback" not in answer.content
    match = re.search(r"error id: (\w+)", answer.content)
    assert match and f"[error_id={match.group(1)}]" in caplog.text


@pytest.mark.parametrize("scripted", [ScriptedLLM(raise_after_text=BackendFailed("stalled"))])
async def test_a_failure_after_some_text_keeps_the_text_and_says_it_was_cut_off(
    world: World,
) -> None:
    await world.alice.send(world.channel, world.mention("hi"))

    (answer,) = world.answers()
    assert answer.content.startswith("echo\n\nSorry, the model failed")
    assert "cut off" in answer.content and "error id:" in answer.content


async def test_an_empty_mention_gets_a_hint(world: World, scripted: ScriptedLLM) -> None:
    await world.alice.send(world.channel, f"<@{world.bot_id}>")

    assert [m.content for m in world.answers()] == [
        "Ask me a question after the mention, and I'll answer here."
    ]
    assert scripted.calls == []


# -- /llm-settings -------------------------------------------------------------------------


async def test_an_admin_changes_the_sampling_of_the_next_answer(
    world: World, scripted: ScriptedLLM
) -> None:
    boss = admin(world)
    result = await boss.slash(world.channel, "llm-settings", args="temperature 0.8")

    assert result.ephemeral and result.response is not None
    assert result.response.content.startswith("Updated: temperature=0.8.")
    await world.alice.send(world.channel, world.mention("hello"))
    assert scripted.calls[-1].sampling.temperature == 0.8
    assert scripted.calls[-1].sampling.top_k == DEFAULTS.top_k
    # The log names who changed it, as a mention Discord renders as their name.
    log = await world.alice.slash(world.channel, "llm-settings", args="log")
    assert log.response is not None and f"{boss.mention}: temperature: default → 0.8" in (
        log.response.content
    )


async def test_a_plain_member_may_show_but_not_change_settings(
    world: World, scripted: ScriptedLLM, service: SupportService
) -> None:
    refused = await world.alice.slash(world.channel, "llm-settings", args="temperature=0.2")
    shown = await world.alice.slash(world.channel, "llm-settings")

    assert refused.ephemeral and refused.response is not None
    assert "Only settings admins" in refused.response.content
    assert shown.response is not None and "temperature = 0.7 (default)" in shown.response.content
    assert (await service.store.channel_settings(world.key())).overrides == {}
    await world.alice.send(world.channel, world.mention("hello"))
    assert scripted.calls[-1].sampling.temperature == DEFAULTS.temperature


async def test_invalid_settings_name_the_range_and_change_nothing(
    world: World, service: SupportService
) -> None:
    result = await admin(world).slash(world.channel, "llm-settings", args="temperature 0.9 top_k 0")

    assert result.response is not None
    assert "top_k" in result.response.content and "1 to 1000" in result.response.content
    assert (await service.store.channel_settings(world.key())).overrides == {}


@pytest.mark.parametrize("role_spec", ["Support Leads", "@support leads", "ROLE_ID"])
async def test_the_settings_role_may_change_settings_by_name_or_id(
    world: World, role_spec: str
) -> None:
    leads = world.guild.create_role("Support Leads")
    bob = world.guild.add_member(world.env.create_user("bob"), roles=[leads])
    world.bot.settings_role = str(leads.id) if role_spec == "ROLE_ID" else role_spec

    result = await bob.slash(world.channel, "llm-settings", args="top_p 0.5")

    assert result.response is not None and result.response.content.startswith("Updated: top_p=0.5")


async def test_in_a_dm_the_user_configures_their_own_conversation(
    world: World, scripted: ScriptedLLM
) -> None:
    dave = world.env.create_user("dave")
    result = await dave.slash("llm-settings", args="do_sample off")
    await dave.send_dm("hello")

    assert result.response is not None and result.response.content.startswith("Updated")
    assert scripted.calls[-1].sampling.do_sample is False


async def test_the_args_option_autocompletes_words_keys_and_values(world: World) -> None:
    async def offered(typed: str) -> list[str]:
        choices = await world.alice.autocomplete(world.channel, "llm-settings", "args", typed)
        return [c["value"] for c in choices]

    assert await offered("") == [
        "show",
        "reset",
        "log",
        "forget",
        "temperature",
        "top_k",
        "top_p",
        "max_new_tokens",
        "do_sample",
        "knowledge",
        "collection",
    ]
    assert await offered("te") == ["temperature"]
    assert await offered("kn") == ["knowledge"]
    assert await offered("temperature 0.8 top_") == [
        "temperature 0.8 top_k",
        "temperature 0.8 top_p",
    ]
    assert await offered("temperature=0.8 do_sample ") == [
        "temperature=0.8 do_sample true",
        "temperature=0.8 do_sample false",
    ]
    assert await offered("show ") == []
    choices = await world.alice.autocomplete(world.channel, "llm-settings", "args", "top_k 5")
    assert choices[0]["value"] == "top_k 5" and "1 to 1000" in choices[0]["name"]


# -- pieces --------------------------------------------------------------------------------


class _FakeResponse:
    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "test"


def _Response(status: int) -> Any:
    """What discord.py's HTTP errors read from a response: its status and reason."""
    return _FakeResponse(status)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (discord.HTTPException(_Response(429), "slow down"), 4.0),
        (discord.HTTPException(_Response(502), "bad gateway"), 4.0),
        (discord.RateLimited(9.5), 9.5),
        (TimeoutError(), 4.0),
        (discord.NotFound(_Response(404), "gone"), None),
        (discord.Forbidden(_Response(403), "no access"), None),
        (ValueError("a bug"), None),
    ],
)
def test_only_transient_write_failures_are_retried_with_backoff(
    exc: BaseException, expected: float | None
) -> None:
    assert retry_delay(exc, attempt=3, base=1.0) == expected
    assert retry_delay(discord.RateLimited(0), attempt=20, base=1.0) == 30.0  # capped


def test_a_code_fence_still_open_while_streaming_is_closed_for_display() -> None:
    assert displayable("  text\n```py\nx = 1", final=False) == "text\n```py\nx = 1\n```"
    assert displayable("```py\nx = 1\n```\n", final=False) == "```py\nx = 1\n```"
    assert displayable("```py\nx = 1", final=True) == "```py\nx = 1"
