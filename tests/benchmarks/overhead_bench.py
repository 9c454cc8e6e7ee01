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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    asyncio.run(run(args.channels, args.rounds))


if __name__ == "__main__":
    main()
