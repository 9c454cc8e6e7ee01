"""RedisStore on a real redis-server: history bounds, TTL, scope keys, one round trip per
operation, persistence; settings storage; the question of a refused turn withdrawn."""

from __future__ import annotations

import asyncio

from bot.conversation import ConversationKey, Message
from bot.store import history_key, settings_key
from tests.conftest import DEFAULTS, make_store
from tests.support.redis_tools import RoundTrips, counting_client, redis_in

KEY = ConversationKey("slack", "T1", "C1")


async def test_append_and_read_returns_history_before_the_question(redis):
    store = make_store(redis, max_messages=10, ttl_seconds=60)
    assert (await store.start_turn(KEY, Message("user", "first"))).history == []
    await store.append(KEY, Message("assistant", "answer one"))
    before = (await store.start_turn(KEY, Message("user", "second"))).history
    assert before == [Message("user", "first"), Message("assistant", "answer one")]
    assert (await store.history(KEY))[-1] == Message("user", "second")


async def test_bounded_by_max_messages_keeping_the_newest(redis):
    store = make_store(redis, max_messages=4, ttl_seconds=60)
    for i in range(7):
        await store.append(KEY, Message("user", f"m{i}"))
    assert [m.content for m in await store.history(KEY)] == ["m3", "m4", "m5", "m6"]


async def test_expires_after_ttl_of_silence_and_each_write_renews(redis):
    store = make_store(redis, max_messages=10, ttl_seconds=60)
    await store.append(KEY, Message("user", "hi"))
    ttl = await redis.ttl(history_key(KEY))
    assert 55 <= ttl <= 60
    await redis.expire(history_key(KEY), 5)
    await store.append(KEY, Message("assistant", "hello"))
    assert await redis.ttl(history_key(KEY)) > 5  # a new message renews the silence window
    short = make_store(redis, max_messages=10, ttl_seconds=1)
    await short.append(KEY, Message("user", "soon gone"))
    await asyncio.sleep(1.3)
    assert await store.history(KEY) == []


async def test_keys_carry_a_cluster_hash_tag_per_channel():
    channel = ConversationKey("slack", "T1", "C1")
    thread = ConversationKey("slack", "T1", "C1", thread="171.5")
    assert history_key(channel) == "sb:{slack:T1:C1}:history"
    assert history_key(thread) == "sb:{slack:T1:C1}:history:171.5"
    assert channel.channel_tag == thread.channel_tag  # same slot as the channel's settings


def test_scope_decides_whose_history_a_thread_joins():
    thread = ConversationKey("slack", "T1", "C1", thread="171.5")
    assert thread.scoped("channel") == ConversationKey("slack", "T1", "C1")
    assert thread.scoped("thread") == thread


async def test_one_round_trip_per_read_and_per_write(redis_server):
    client = counting_client(redis_server.url)
    store = make_store(client, max_messages=10, ttl_seconds=60)
    await store.append(KEY, Message("user", "warm up"))  # connects (handshake not counted below)
    trips = RoundTrips.count
    await store.append(KEY, Message("assistant", "a"))
    assert RoundTrips.count - trips == 1
    trips = RoundTrips.count
    assert len((await store.start_turn(KEY, Message("user", "q"))).history) == 2
    assert RoundTrips.count - trips == 1
    trips = RoundTrips.count
    await store.history(KEY)
    assert RoundTrips.count - trips == 1
    await client.aclose()


async def test_unicode_and_newlines_survive(redis):
    store = make_store(redis, max_messages=10, ttl_seconds=60)
    text = "배송은 언제 되나요?\n```py\nprint('hi')\n```"
    await store.append(KEY, Message("user", text))
    assert (await store.history(KEY))[0].content == text


async def test_forget_removes_channel_and_thread_histories_only(redis):
    store = make_store(redis, max_messages=10, ttl_seconds=60)
    other = ConversationKey("slack", "T1", "C2")
    await store.append(KEY, Message("user", "a"))
    await store.append(ConversationKey("slack", "T1", "C1", "9.1"), Message("user", "b"))
    await store.append(other, Message("user", "c"))
    assert await store.forget(KEY, "U1") == 2
    assert await store.history(KEY) == []
    assert await store.history(other) == [Message("user", "c")]


async def test_history_survives_a_redis_restart(tmp_path):
    async with redis_in(tmp_path) as client:
        store = make_store(client, max_messages=10, ttl_seconds=60)
        await store.append(KEY, Message("user", "remember me"))
    async with redis_in(tmp_path) as client:
        store = make_store(client, max_messages=10, ttl_seconds=60)
        assert await store.history(KEY) == [Message("user", "remember me")]


async def test_start_turn_reads_settings_and_history_in_one_round_trip(redis_server):
    client = counting_client(redis_server.url)
    store = make_store(client)
    await store.change_settings(KEY, "U1", {"top_k": 7})
    await store.append(KEY, Message("user", "q0"), Message("assistant", "a0"))
    trips = RoundTrips.count
    turn = await store.start_turn(KEY, Message("user", "q1"))
    assert RoundTrips.count - trips == 1
    assert turn.settings.effective.top_k == 7
    assert turn.history == [Message("user", "q0"), Message("assistant", "a0")]
    await client.aclose()


async def test_withdraw_takes_back_only_the_newest_copy_of_the_question(redis):
    store = make_store(redis)
    same = Message("user", "again?")
    await store.append(KEY, same, Message("assistant", "yes"))
    await store.start_turn(KEY, same)
    await store.withdraw(KEY, same)
    assert await store.history(KEY) == [same, Message("assistant", "yes")]


async def test_settings_survive_a_restart(tmp_path):
    async with redis_in(tmp_path) as client:
        store = make_store(client)
        await store.change_settings(KEY, "U1", {"temperature": 1.3, "do_sample": True})
    async with redis_in(tmp_path) as client:
        store = make_store(client)
        assert (await store.channel_settings(KEY)).effective.temperature == 1.3
        assert await client.ttl(settings_key(KEY)) == -1  # never expires


async def test_stored_value_above_a_lowered_limit_falls_back_to_default(redis):
    high = make_store(redis, limit=4096)
    await high.change_settings(KEY, "U1", {"max_new_tokens": 3000})
    low = make_store(redis, limit=1024)
    assert (await low.channel_settings(KEY)).effective.max_new_tokens == DEFAULTS.max_new_tokens


async def test_change_returns_what_is_stored(redis):
    store = make_store(redis)
    await store.change_settings(KEY, "U1", {"top_k": 3})
    changed = await store.change_settings(KEY, "U1", {"temperature": 0.2})
    assert changed == await store.channel_settings(KEY)
    assert changed.overrides == {"top_k": 3, "temperature": 0.2}


async def test_a_question_asked_again_after_a_failed_answer_is_stored_once(redis):
    """The same question again with nothing after it (its answer failed, or the replica answering
    it died and the event was re-delivered): stored once; a different question is stored."""
    store = make_store(redis)
    await store.append(KEY, Message("user", "q0"), Message("assistant", "a0"))
    first = await store.start_turn(KEY, Message("user", "again?"))
    second = await store.start_turn(KEY, Message("user", "again?"))
    assert first.question_stored and not second.question_stored
    assert first.history == second.history == [Message("user", "q0"), Message("assistant", "a0")]
    other = await store.start_turn(KEY, Message("user", "something else"))
    assert other.question_stored
    assert await store.history(KEY) == [
        Message("user", "q0"),
        Message("assistant", "a0"),
        Message("user", "again?"),
        Message("user", "something else"),
    ]
