"""HistoryStore on a real redis-server: bounds, TTL, scope keys, one round trip, persistence."""

from __future__ import annotations

import asyncio

from bot.conversation import ConversationKey, HistoryStore, Message, history_key
from tests.support.redis_tools import RoundTrips, counting_client, redis_in

KEY = ConversationKey("slack", "T1", "C1")


async def test_append_and_read_returns_history_before_the_question(redis):
    store = HistoryStore(redis, max_messages=10, ttl_seconds=60)
    assert await store.append_and_read(KEY, Message("user", "first")) == []
    await store.append(KEY, Message("assistant", "answer one"))
    before = await store.append_and_read(KEY, Message("user", "second"))
    assert before == [Message("user", "first"), Message("assistant", "answer one")]
    assert (await store.read(KEY))[-1] == Message("user", "second")


async def test_bounded_by_max_messages_keeping_the_newest(redis):
    store = HistoryStore(redis, max_messages=4, ttl_seconds=60)
    for i in range(7):
        await store.append(KEY, Message("user", f"m{i}"))
    assert [m.content for m in await store.read(KEY)] == ["m3", "m4", "m5", "m6"]


async def test_expires_after_ttl_of_silence_and_each_write_renews(redis):
    store = HistoryStore(redis, max_messages=10, ttl_seconds=60)
    await store.append(KEY, Message("user", "hi"))
    ttl = await redis.ttl(history_key(KEY))
    assert 55 <= ttl <= 60
    await redis.expire(history_key(KEY), 5)
    await store.append(KEY, Message("assistant", "hello"))
    assert await redis.ttl(history_key(KEY)) > 5  # a new message renews the silence window
    short = HistoryStore(redis, max_messages=10, ttl_seconds=1)
    await short.append(KEY, Message("user", "soon gone"))
    await asyncio.sleep(1.3)
    assert await store.read(KEY) == []


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
    store = HistoryStore(client, max_messages=10, ttl_seconds=60)
    await store.append(KEY, Message("user", "warm up"))  # connects (handshake not counted below)
    trips = RoundTrips.count
    await store.append(KEY, Message("assistant", "a"))
    assert RoundTrips.count - trips == 1
    trips = RoundTrips.count
    assert len(await store.append_and_read(KEY, Message("user", "q"))) == 2
    assert RoundTrips.count - trips == 1
    trips = RoundTrips.count
    await store.read(KEY)
    assert RoundTrips.count - trips == 1
    await client.aclose()


async def test_unicode_and_newlines_survive(redis):
    store = HistoryStore(redis, max_messages=10, ttl_seconds=60)
    text = "배송은 언제 되나요?\n```py\nprint('hi')\n```"
    await store.append(KEY, Message("user", text))
    assert (await store.read(KEY))[0].content == text


async def test_forget_removes_channel_and_thread_histories_only(redis):
    store = HistoryStore(redis, max_messages=10, ttl_seconds=60)
    other = ConversationKey("slack", "T1", "C2")
    await store.append(KEY, Message("user", "a"))
    await store.append(ConversationKey("slack", "T1", "C1", "9.1"), Message("user", "b"))
    await store.append(other, Message("user", "c"))
    assert await store.forget(KEY) == 2
    assert await store.read(KEY) == []
    assert await store.read(other) == [Message("user", "c")]


async def test_history_survives_a_redis_restart(tmp_path):
    async with redis_in(tmp_path) as client:
        store = HistoryStore(client, max_messages=10, ttl_seconds=60)
        await store.append(KEY, Message("user", "remember me"))
    async with redis_in(tmp_path) as client:
        store = HistoryStore(client, max_messages=10, ttl_seconds=60)
        assert await store.read(KEY) == [Message("user", "remember me")]
