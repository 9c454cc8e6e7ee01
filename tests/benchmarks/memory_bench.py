"""Memory: the engine does not grow with questions served, and Redis holds a bounded history.

    python -m tests.benchmarks.memory_bench                  # tiny model on CPU
    python -m tests.benchmarks.memory_bench --size full --device cuda

Engine: memory after 1,000 questions (--questions) against memory after 10 (GPU:
torch.cuda.memory_allocated; CPU: the process's resident set), plus the engine's own
bookkeeping (requests in flight, result handlers, undelivered outputs). Redis: used_memory per
channel after 10 turns and after 100 turns per channel, with HISTORY_MAX_MESSAGES=40.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
from pathlib import Path

import torch

from bot.conversation import ConversationKey, Message
from bot.ops.redis_server import RedisServer, free_port
from bot.sampling import SamplingSettings
from bot.store import RedisStore
from tests.benchmarks.engine_bench import build_model, in_memory_engine, prompt, word_tokenizer
from tests.support.redis_tools import counting_client


def resident_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def engine_memory(device: str) -> float:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    return resident_mib()


async def engine_part(size: str, device: str, concurrency: int, questions: int) -> None:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_model(size, device, dtype)
    engine = in_memory_engine(model, word_tokenizer(int(model.config.vocab_size)), device)
    sampling = SamplingSettings(temperature=0.9, top_k=50, top_p=0.9, max_new_tokens=16)
    await engine.start()
    try:

        async def answer(i: int) -> None:
            encoded = await asyncio.to_thread(engine.encode, prompt(i, 8 + i % 32))
            async for _ in engine.stream(encoded, sampling):
                pass

        async def serve(count: int, start: int) -> None:
            end = start + count
            for batch in range(start, end, concurrency):
                await asyncio.gather(
                    *(answer(i) for i in range(batch, min(batch + concurrency, end)))
                )

        await serve(10, 0)
        after_10 = engine_memory(device)
        await serve(questions - 10, 10)
        after_all = engine_memory(device)
        router = engine.manager.output_router
        unit = "GPU MiB allocated" if device.startswith("cuda") else "MiB resident"
        print(
            f"engine ({size}, {device}): after 10 questions {after_10:.1f} {unit}, "
            f"after {questions} {after_all:.1f} ({after_all - after_10:+.1f})"
        )
        print(
            f"  in flight {engine.in_flight}, result handlers {len(router.result_handlers)}, "
            f"undelivered outputs {router.output_queue.qsize()}"
        )
    finally:
        await engine.aclose()


async def redis_part(channels: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        server = RedisServer(Path(data), port=free_port(), persist=False).start()
        redis = counting_client(server.url)
        try:
            store = RedisStore(
                redis,
                defaults=SamplingSettings(),
                max_new_tokens_limit=4096,
                max_messages=40,
                ttl_seconds=3600,
            )
            keys = [ConversationKey("slack", "T1", f"C{i}") for i in range(channels)]
            base = int((await redis.info("memory"))["used_memory"])
            answer = "Thanks for asking! " * 20  # ~400 characters, a typical short answer

            async def turns(count: int) -> None:
                for _ in range(count):
                    await asyncio.gather(
                        *(
                            store.append(
                                k,
                                Message("user", "When will order 1234 ship?"),
                                Message("assistant", answer),
                            )
                            for k in keys
                        )
                    )

            await turns(10)
            after_10 = (int((await redis.info("memory"))["used_memory"]) - base) / channels
            await turns(90)
            after_100 = (int((await redis.info("memory"))["used_memory"]) - base) / channels
            kept = len(await store.history(keys[0]))
            print(
                f"redis: {after_10 / 1024:.1f} KiB per channel after 10 turns, "
                f"{after_100 / 1024:.1f} KiB after 100 turns ({kept} messages kept of 200)"
            )
        finally:
            await redis.aclose()
            server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--questions", type=int, default=1000)
    args = parser.parse_args(argv)
    asyncio.run(engine_part(args.size, args.device, args.concurrency, args.questions))
    asyncio.run(redis_part(args.channels))


if __name__ == "__main__":
    main()
