"""Bot overhead: what the service adds around an instant backend, with real Redis.

    python -m tests.benchmarks.overhead_bench --channels 100 --rounds 10

Per question: the service's whole path (settings read, question stored, history read, prompt
built, answer stored) timed end to end with a backend that answers at once, and the number of
Redis round trips it costs. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bot.conversation import ConversationKey
from bot.llm.chain import LLMChain
from bot.ops.redis_server import RedisServer, free_port
from bot.platforms.frontdoor import FrontDoor
from bot.sampling import SamplingSettings
from bot.service import SupportService, User
from bot.store import RedisStore
from tests.support.backends import ScriptedLLM
from tests.support.redis_tools import RoundTrips, counting_client


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(channels: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        server = RedisServer(Path(data), port=free_port(), persist=False).start()
        redis = counting_client(server.url)
        try:
            llm = LLMChain(ScriptedLLM(chunk_size=1_000), None)
            await llm.start()
            store = RedisStore(
                redis,
                defaults=SamplingSettings(),
                max_new_tokens_limit=4096,
                max_messages=40,
                ttl_seconds=3600,
            )
            service = SupportService(
                store=store,
                llm=llm,
                persona="You are a support bot.",
            )
            user = User("U1")
            keys = [ConversationKey("slack", "T1", f"C{i}") for i in range(channels)]

            async def ask(key: ConversationKey, text: str) -> float:
                began = time.perf_counter()
                async for _ in service.ask(key, user, text):
                    pass
                return time.perf_counter() - began

            await ask(keys[0], "warm up")
            trips = RoundTrips.count
            samples = [
                await ask(key, f"question {r} about order {i}")
                for r in range(rounds)
                for i, key in enumerate(keys)
            ]
            per_question = (RoundTrips.count - trips) / len(samples)
            print(f"{len(samples)} questions over {channels} channels, one at a time:")
            print(
                f"  overhead per question: p50 {statistics.median(samples) * 1000:.2f} ms, "
                f"p99 {percentile(samples, 0.99) * 1000:.2f} ms"
            )
            print(f"  Redis round trips per question: {per_question:.2f}")

            # The same questions as a platform asks them: through a front door whose
            # exactly-once claim is a lease on the event and the conversation's turn.
            door = FrontDoor(service, "slack", drain_timeout_s=5.0)
            sink = _NullSink()
            events = iter(range(1_000_000_000))

            async def ask_door(key: ConversationKey, text: str) -> None:
                event = f"E{next(events)}"

                async def admit() -> bool:
                    return await door.claim((event,), "message")

                await door.answer(key, user, text, sink, admit=admit, interval_s=1.0)

            trips = RoundTrips.count
            for r in range(rounds):
                for key in keys:
                    await ask_door(key, f"door question {r}")
            through_door = (RoundTrips.count - trips) / (rounds * len(keys))
            print(
                f"  through a front door (event + turn lease, done mark): {through_door:.2f} "
                f"round trips per question, {through_door - per_question - 1:+.2f} over "
                "the service plus the claim it always had"
            )
            began = time.perf_counter()
            await asyncio.gather(*(ask(key, "all at once") for key in keys))
            elapsed = time.perf_counter() - began
            print(
                f"{channels} channels at once: {elapsed * 1000:.1f} ms in all, "
                f"{channels / elapsed:.0f} questions/s"
            )
        finally:
            await redis.aclose()
            server.stop()


class _NullSink:
    """A platform that shows nothing (the front door's writes cost no Redis)."""

    async def working(self) -> None:
        pass

    def wait_s(self) -> float:
        return 0.0

    async def show(self, text: str) -> bool:
        return True

    async def finish(self, text: str, answer_id: str | None = None) -> None:
        pass

    async def tell(self, text: str) -> None:
        pass

    def cancel(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    asyncio.run(run(args.channels, args.rounds))


if __name__ == "__main__":
    main()
