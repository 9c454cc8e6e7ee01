"""What a knowledge question does to the local model's speed on a CPU: single-stream ms/token of
the engine on a fresh process, after questions embedded as the bot embeds them (a thread of its
own, bot/ops/threads.py), and after one embedded on asyncio.to_thread's pooled threads (as the
bot did before), which leaves an OpenMP team alive beside the engine's.

Prints figures; asserts nothing about speed. The pooled-thread side runs last: its team cannot be
taken back, so it cannot be interleaved.

    python -m tests.benchmarks.threads_bench --size proxy --new-tokens 64 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

import torch

from bot.knowledge.embed import Embedder
from bot.ops.threads import on_own_thread
from tests.benchmarks import engine_bench
from tests.support.knowledge import minilm_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "proxy"], default="proxy")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    model = await on_own_thread(engine_bench.build_model, args.size, "cpu", torch.float32)
    tokenizer = engine_bench.word_tokenizer(int(model.config.vocab_size))
    engine = engine_bench.in_memory_engine(model, tokenizer, "cpu")
    embedder = Embedder(minilm_path())
    fresh = iter(range(1000, 10**9, 997))
    figures: dict[str, list[float]] = {}

    async def measure(label: str) -> None:
        ms = [
            (await engine_bench.single_stream(engine, 16, args.new_tokens, next(fresh)))[0]
            for _ in range(args.repeat)
        ]
        figures[label] = ms
        print(
            f"{label}: ms/token min/median/max {min(ms):.1f}/{statistics.median(ms):.1f}/"
            f"{max(ms):.1f}; threads in the process {len(os.listdir('/proc/self/task'))}",
            flush=True,
        )

    await engine.start()
    try:
        print(f"CPU, {torch.get_num_threads()} torch threads; model {args.size}", flush=True)
        await measure("fresh engine")
        await on_own_thread(embedder.load)
        for question in ("where is my order?", "배송은 언제 되나요?"):
            await on_own_thread(embedder.query, question)
        await measure("after questions embedded on threads of their own (the bot)")
        await asyncio.to_thread(embedder.query, "how do I return an item?")
        await measure("after one question embedded on asyncio.to_thread (before)")
    finally:
        await engine.aclose()
    return figures


if __name__ == "__main__":
    asyncio.run(main())
