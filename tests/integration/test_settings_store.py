"""Channel settings in real Redis: set, all-or-nothing, reset, audit log, restart persistence."""

from __future__ import annotations

from redis.asyncio import Redis

from bot.conversation import ConversationKey
from bot.sampling import SamplingSettings
from bot.service import User
from tests.conftest import DEFAULTS, make_service
from tests.support.backends import ScriptedLLM

KEY = ConversationKey("slack", "T1", "C1")
ADMIN = User("U_ADMIN", can_configure=True)
MEMBER = User("U_MEMBER", can_configure=False)


async def snapshot(redis: Redis) -> dict[bytes | str, object]:
    out: dict[bytes | str, object] = {}
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = await redis.hgetall(key)
        elif kind == b"list":
            out[key] = await redis.lrange(key, 0, -1)
    return out


async def started(redis, **kw):
    svc = make_service(redis, ScriptedLLM(), **kw)
    await svc.llm.start()
    return svc


async def test_set_one_and_many_keys_and_show_effective_values(redis):
    svc = await started(redis)
    reply = await svc.settings(KEY, ADMIN, "temperature 0.8")
    assert "Updated: temperature=0.8" in reply
    reply = await svc.settings(KEY, ADMIN, "temperature=0.7 top_p=0.9 top_k=50 do_sample=off")
    got = await svc.store.channel_settings(KEY)
    assert got.effective == SamplingSettings(0.7, 50, 0.9, DEFAULTS.max_new_tokens, False)
    assert set(got.overrides) == {"temperature", "top_p", "top_k", "do_sample"}
    show = await svc.settings(KEY, MEMBER, "show")
    assert "temperature = 0.7 (set in this channel)" in show
    assert f"max_new_tokens = {DEFAULTS.max_new_tokens} (default)" in show
    assert "unused while do_sample is false" in show
    assert "Answering: test:scripted" in show


async def test_settings_are_per_channel_and_shared_by_its_threads(redis):
    svc = await started(redis, scope="thread")
    await svc.settings(ConversationKey("slack", "T1", "C1", "5.5"), ADMIN, "top_k 3")
    assert (await svc.store.channel_settings(KEY)).effective.top_k == 3
    other = ConversationKey("slack", "T1", "C2")
    assert (await svc.store.channel_settings(other)).effective.top_k == DEFAULTS.top_k


async def test_invalid_input_changes_nothing(redis):
    svc = await started(redis)
    await svc.settings(KEY, ADMIN, "temperature 0.9")
    before = await snapshot(redis)
    for bad in [
        "temperature 0.5 top_k 0",
        "top_p 2",
        "colour red",
        "max_new_tokens 99999",
        "temperature=0.3 do_sample=maybe",
        "temperature",
    ]:
        reply = await svc.settings(KEY, ADMIN, bad)
        assert reply.endswith("Nothing was changed."), reply
        assert await snapshot(redis) == before


async def test_member_cannot_change_reset_or_forget_but_can_show_and_log(redis):
    svc = await started(redis)
    before = await snapshot(redis)
    for command in ["temperature 0.5", "reset", "forget"]:
        reply = await svc.settings(KEY, MEMBER, command)
        assert "Only settings admins" in reply and "Nothing was changed" in reply
    assert await snapshot(redis) == before
    assert "LLM settings" in await svc.settings(KEY, MEMBER, "")
    assert "No settings changes" in await svc.settings(KEY, MEMBER, "log")


async def test_reset_and_audit_log(redis):
    svc = await started(redis)
    await svc.settings(KEY, ADMIN, "temperature 0.5")
    await svc.settings(KEY, ADMIN, "temperature 0.6 top_k 7")
    reply = await svc.settings(KEY, ADMIN, "reset")
    assert "Back to the defaults" in reply
    got = await svc.store.channel_settings(KEY)
    assert got.effective == DEFAULTS and got.overrides == {}
    log = await svc.settings(KEY, MEMBER, "log")
    lines = log.splitlines()[1:]
    assert "U_ADMIN: reset (" in lines[0] and "temperature: 0.6 → default" in lines[0]
    assert "temperature: 0.5 → 0.6" in lines[1] and "top_k: default → 7" in lines[1]
    assert "temperature: default → 0.5" in lines[2]


async def test_forget_deletes_history_and_is_logged(redis):
    svc = await started(redis)
    async for _ in svc.ask(KEY, MEMBER, "hello"):
        pass
    assert await svc.store.history(KEY)
    assert "Forgot" in await svc.settings(KEY, ADMIN, "forget")
    assert await svc.store.history(KEY) == []
    assert "forgot the conversation history" in await svc.settings(KEY, ADMIN, "log")


async def test_show_says_what_a_backend_cannot_honour(redis):
    gpt = ScriptedLLM(label="gpt", unsupported=frozenset({"top_k"}))
    svc = make_service(redis, ScriptedLLM(fail_start="no GPU"), gpt)
    await svc.llm.start()
    show = await svc.settings(KEY, MEMBER, "show")
    assert "Answering: test:gpt" in show
    assert "top_k = 50 (default) — test:gpt cannot honour it" in show
    assert "primary: test:scripted — unavailable: no GPU" in show
