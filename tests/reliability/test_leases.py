"""Exactly-once across replicas, through crashes: two replicas (a FrontDoor and a SupportService
each, over one real Redis) sharing events. A claim is a lease renewed while the answer is
produced and marked done once delivered; a replica that dies mid-answer (its answer task
cancelled and nothing more written, its lease left to expire) leaves the event to the next
delivery, which the other replica answers exactly once (tests/e2e/test_slack_cli.py does it with
SIGKILLed processes). An answer cut at shutdown lets its event and turn go at once. A
conversation's turns are leased too, so two replicas taking alternating turns of one channel
store its history in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis

from bot.conversation import ConversationKey, Message
from bot.platforms.frontdoor import FrontDoor
from bot.service import SupportService, User
from bot.store import claim_key
from tests.conftest import make_service
from tests.support.backends import ScriptedLLM

KEY = ConversationKey("slack", "T1", "C-lease")
USER = User("U1")
LEASE_S = 0.6


@dataclass
class RecordingSink:
    """A platform's message, as the front door writes it."""

    finished: list[str] = field(default_factory=list)
    told: list[str] = field(default_factory=list)

    async def working(self) -> None:
        pass

    def wait_s(self) -> float:
        return 0.0

    async def show(self, text: str) -> bool:
        return True

    async def finish(self, text: str, answer_id: str | None = None) -> None:
        self.finished.append(text)

    async def tell(self, text: str) -> None:
        self.told.append(text)

    def cancel(self) -> None:
        pass

    async def cut(self, text: str) -> None:  # the shutdown path, never reached here
        self.told.append(text)


@dataclass
class Replica:
    door: FrontDoor
    backend: ScriptedLLM
    sink: RecordingSink = field(default_factory=RecordingSink)

    @property
    def service(self) -> SupportService:
        return self.door.service

    def deliver(self, event_id: str, text: str, key: ConversationKey = KEY) -> asyncio.Task[None]:
        """One delivery of an event to this replica, answered as the platforms do it."""

        async def admit() -> bool:
            return await self.door.claim((event_id,), "message")

        work = self.door.answer(key, USER, text, self.sink, admit=admit, interval_s=0.01)
        assert self.door.start(work, event_id)
        (task,) = [t for t in self.door.tasks if t.get_name() == f"answer {event_id}"]
        return task


async def replica(redis: Redis, backend: ScriptedLLM) -> Replica:
    service = make_service(redis, backend)
    service.store.lease_s = LEASE_S
    await service.llm.start()
    return Replica(FrontDoor(service, "slack", drain_timeout_s=1.0), backend)


async def crash(replica: Replica, task: asyncio.Task[None]) -> None:
    """The replica dies mid-answer: nothing it would write on the way out reaches Redis."""

    async def nothing(*args: object, **kwargs: object) -> None:
        return None

    replica.service.store.complete = nothing  # type: ignore[method-assign]
    replica.service.store.release = nothing  # type: ignore[method-assign]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def wait_until(predicate: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_an_event_whose_replica_died_mid_answer_is_answered_once_by_another(
    redis: Redis,
) -> None:
    a = await replica(redis, ScriptedLLM(label="a", hang_s=60))  # never finishes
    b = await replica(redis, ScriptedLLM(label="b"))

    dying = a.deliver("Ev1", "q1")
    await wait_until(lambda: a.backend.calls)  # A holds the lease and is answering
    # Longer than the lease: A renews it, so Slack's retry to B is a duplicate.
    await asyncio.sleep(LEASE_S * 2)
    await b.deliver("Ev1", "q1")
    assert b.sink.finished == [] and b.backend.calls == []

    await crash(a, dying)  # A dies: no renewal, no done mark; its lease runs out
    token = await redis.get(claim_key("slack", "Ev1"))
    assert isinstance(token, bytes) and not token.startswith(b"done:")  # a lease, not a done mark
    await asyncio.sleep(LEASE_S + 0.2)

    await b.deliver("Ev1", "q1")  # the next delivery, after the lease expired
    assert b.sink.finished == ["echo: q1"]
    done = await redis.get(claim_key("slack", "Ev1"))
    assert isinstance(done, bytes) and done.startswith(b"done:")
    assert await redis.ttl(claim_key("slack", "Ev1")) > 3000  # outlives Slack's retries

    for _ in range(2):  # any later copy, to either replica, is ignored
        await b.deliver("Ev1", "q1")
        await a.deliver("Ev1", "q1")
    assert b.sink.finished == ["echo: q1"] and a.sink.finished == []
    assert len(b.backend.calls) == 1


async def test_alternating_turns_of_one_channel_on_two_replicas_stay_in_order(
    redis: Redis,
) -> None:
    slow, quick = ScriptedLLM(label="slow", hang_s=0.5), ScriptedLLM(label="quick")
    a, b = await replica(redis, slow), await replica(redis, quick)
    # q1 to A (slow to answer); q2 to B while A is still answering; then q3 to A, q4 to B.
    first = a.deliver("E1", "q1")
    await wait_until(lambda: slow.calls)
    second = b.deliver("E2", "q2")
    await asyncio.gather(first, second)
    third = a.deliver("E3", "q3")
    await wait_until(lambda: len(slow.calls) == 2)
    await asyncio.gather(third, b.deliver("E4", "q4"))

    history = await a.service.store.history(KEY)
    assert history == [
        Message("user", "q1"),
        Message("assistant", "echo: q1"),
        Message("user", "q2"),
        Message("assistant", "echo: q2"),
        Message("user", "q3"),
        Message("assistant", "echo: q3"),
        Message("user", "q4"),
        Message("assistant", "echo: q4"),
    ]
    # B saw q1 and its answer when it answered q2: the prompt is in order too.
    assert [m["content"] for m in quick.calls[0].messages[1:]] == ["q1", "echo: q1", "q2"]
    assert await redis.exists("sb:" + KEY.channel_tag + ":turn") == 0  # the turn passed on


@pytest.mark.parametrize("lease_s", [LEASE_S])
async def test_a_turn_held_by_a_dead_replica_passes_on_when_its_lease_expires(
    redis: Redis, lease_s: float
) -> None:
    a = await replica(redis, ScriptedLLM(label="a", hang_s=60))
    b = await replica(redis, ScriptedLLM(label="b"))
    dying = a.deliver("E1", "q1")
    await wait_until(lambda: a.backend.calls)
    await crash(a, dying)
    began = asyncio.get_running_loop().time()
    await b.deliver("E2", "q2")  # waits for A's turn lease to run out, then answers
    assert b.sink.finished == ["echo: q2"]
    assert asyncio.get_running_loop().time() - began < lease_s + 1.0


async def test_an_answer_cut_at_shutdown_lets_its_turn_and_event_go_at_once(redis: Redis) -> None:
    a = await replica(redis, ScriptedLLM(label="a", hang_s=60))
    b = await replica(redis, ScriptedLLM(label="b"))
    a.deliver("E1", "q1")
    await wait_until(lambda: a.backend.calls)
    await a.door.drain(timeout_s=0.05)  # SIGTERM with a grace period shorter than the answer
    assert await redis.exists(claim_key("slack", "E1")) == 0  # let go, not left to expire
    began = asyncio.get_running_loop().time()
    await b.deliver("E2", "q2")  # the channel's next question does not wait for A's lease
    assert asyncio.get_running_loop().time() - began < LEASE_S / 2
    assert b.sink.finished == ["echo: q2"]
    await b.deliver("E1", "q1")  # and a re-delivery of the cut event is answered
    assert b.sink.finished == ["echo: q2", "echo: q1"]
