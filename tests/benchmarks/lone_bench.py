"""One question at a time on a CPU: the engine decoding from the keys it keeps for a lone request
(bot/llm/lone_decode.py), the same engine reading every key from its paged cache at every step
(as transformers does, and the engine did before), and the seed's pipeline.

Prints figures; asserts nothing about speed. The three sides run in the same process on the same
model (engine_bench's proxy), interleaved (the side that runs first rotates), --repeat times each,
with a fresh prompt every time; tokens/s per answer (prompt included) min/median/max, and the
ratios of the medians.

    python -m tests.benchmarks.lone_bench --size proxy --words 16,250,500,1000 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bot.llm.lone_decode import LoneDecode
from bot.ops.threads import on_own_thread
from tests.benchmarks import engine_bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIDES = ["kept keys", "paged read", "pipeline"]


def spread(values: list[float]) -> str:
    """min/median/max to a tenth: one question's tokens/s are in the twenties on a CPU."""
    return "/".join(f"{v:.1f}" for v in (min(values), statistics.median(values), max(values)))


@contextmanager
def paged_read_only() -> Iterator[None]:
    """The engine as it was before kept keys: every lone step left to the paged read."""
    real = LoneDecode.begin

    def declined(self: LoneDecode, *args: Any) -> bool:
        self.forget()
        return False

    setattr(LoneDecode, "begin", declined)  # noqa: B010 (mypy rejects assigning a method)
    try:
        yield
    finally:
        setattr(LoneDecode, "begin", real)  # noqa: B010


async def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "proxy"], default="proxy")
    parser.add_argument("--words", default="16,250,500,1000", type=engine_bench.ints)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    model = await on_own_thread(engine_bench.build_model, args.size, "cpu", torch.float32)
    tokenizer = engine_bench.word_tokenizer(int(model.config.vocab_size))
    from transformers import pipeline

    pipe: Any = await on_own_thread(pipeline, "text-generation", model=model, tokenizer=tokenizer)
    await on_own_thread(engine_bench.pipeline_run, pipe, 1, 8, 2, 0)
    engine = engine_bench.in_memory_engine(model, tokenizer, "cpu")
    fresh = iter(range(1000, 10**9, 997))
    rows: dict[str, dict[str, list[float]]] = {}
    await engine.start()
    try:
        print(f"CPU, {torch.get_num_threads()} torch threads; model {args.size}; one question, "
              f"{args.new_tokens} new tokens; tokens/s min/median/max", flush=True)  # fmt: skip
        for words in args.words:
            rates: dict[str, list[float]] = {side: [] for side in SIDES}
            for rep in range(args.repeat):
                for side in SIDES[rep % 3 :] + SIDES[: rep % 3]:
                    base = next(fresh)
                    if side == "pipeline":
                        run = await engine_bench.baseline(
                            engine, engine_bench.pipeline_run, pipe, 1, words, args.new_tokens, base
                        )
                    elif side == "paged read":
                        with paged_read_only():
                            run = await engine_bench.warmed_engine_run(
                                engine, 1, words, args.new_tokens, base
                            )
                    else:
                        run = await engine_bench.warmed_engine_run(
                            engine, 1, words, args.new_tokens, base
                        )
                    rates[side].append(run.tokens_per_s)
            med = {side: statistics.median(v) for side, v in rates.items()}
            tokens = len(engine.encode(engine_bench.prompt(0, words)).ids or [])
            print(
                f"~{tokens:4d}-token prompt: "
                + ", ".join(f"{side} {spread(rates[side])}" for side in SIDES)
                + f"; kept/paged {med['kept keys'] / med['paged read']:.2f}x, kept/pipeline "
                f"{med['kept keys'] / med['pipeline']:.2f}x, paged/pipeline "
                f"{med['paged read'] / med['pipeline']:.2f}x",
                flush=True,
            )
            rows[f"{words}w"] = rates
    finally:
        await engine.aclose()
    return rows


if __name__ == "__main__":
    asyncio.run(main())
