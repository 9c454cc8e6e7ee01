"""One question at a time on a CPU: the engine decoding from the keys it keeps for a lone request
(bot/llm/lone_decode.py), the same engine reading every key from its paged cache at every step
(as transformers does, and the engine did before), and the seed's pipeline.

Prints figures; asserts nothing about speed. The three sides run in the same process on the same
model (engine_bench's proxy), --repeat times each, with a fresh prompt every time; tokens/s per
answer (prompt included) min/median/max, and the ratios of the medians. Each repetition runs the
pipeline first (on a thread of its own, the engine's thread stopped meanwhile, as engine_bench
does), then one untimed answer of the same size on the engine (the first answer of a restarted
generation thread was at times ~20 % slower, on either engine side), then the two engine sides
back to back, twice, in the order A B B A (so 2 x --repeat answers each).

First it times one layer's share of a decoding step at 150, 500 and 1,000 keys, with the model's
head shapes: the paged read (transformers writes the token and gathers every key from a cache
laid out in pages, then attention), kept keys (transformers writes the token, `LoneDecode.attend`
appends it and attends) and `generate`'s growing cache (`torch.cat`, then attention); the
fastest of 3 rounds of 300 calls each, interleaved.

    python -m tests.benchmarks.lone_bench --size proxy --words 16,250,500,1000 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


def one_layer(config: Any, keys: int, calls: int = 300, rounds: int = 3) -> dict[str, float]:
    """Microseconds per call of one layer's cache update and attention, each way (see above)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim, page = config.hidden_size // heads, 256
    stride = 2 * config.num_hidden_layers * page  # a page of each layer's keys, then values
    cache = torch.randn(stride * (keys // page + 1), kv_heads, head_dim)
    values_view = cache[page:]
    read = torch.tensor([i // page * stride + i % page for i in range(keys)])
    write = read[-1:]
    new = torch.randn(1, kv_heads, head_dim)
    query = torch.randn(1, heads, 1, head_dim)

    def paged() -> Any:
        cache.index_copy_(0, write, new)
        values_view.index_copy_(0, write, new)
        k = cache.index_select(0, read).transpose(0, 1).unsqueeze(0)
        v = values_view.index_select(0, read).transpose(0, 1).unsqueeze(0)
        return sdpa(query, k, v, enable_gqa=True)

    lone, layer = LoneDecode(), object()
    full = cache.index_select(0, read).transpose(0, 1).unsqueeze(0)
    lone.length, lone.appending = keys, False
    lone.attend(layer, query, full, full, None, True)  # the copy step
    lone.appending = True
    step = new.transpose(0, 1).unsqueeze(0)

    def kept() -> Any:
        cache.index_copy_(0, write, new)
        values_view.index_copy_(0, write, new)
        return lone.attend(layer, query, step, step, None, True)

    past_k, past_v = full[:, :, :-1].contiguous(), full[:, :, :-1].contiguous()

    def generate() -> Any:
        k, v = torch.cat([past_k, step], dim=2), torch.cat([past_v, step], dim=2)
        return sdpa(query, k, v, enable_gqa=True)

    ways = {"paged read": paged, "kept keys": kept, "generate": generate}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(rounds):
        for name, way in ways.items():
            way()  # warm
            began = time.perf_counter()
            for _ in range(calls):
                way()
            best[name] = min(best[name], (time.perf_counter() - began) / calls * 1e6)
    return best


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
    for keys in (150, 500, 1000):
        us = await on_own_thread(one_layer, model.config, keys)
        print(
            f"one layer, {keys:4d} keys: "
            + ", ".join(f"{way} {value:.0f} us" for way, value in us.items()),
            flush=True,
        )
    await engine.start()
    try:
        print(f"CPU, {torch.get_num_threads()} torch threads; model {args.size}; one question, "
              f"{args.new_tokens} new tokens; tokens/s min/median/max", flush=True)  # fmt: skip
        for words in args.words:
            rates: dict[str, list[float]] = {side: [] for side in SIDES}
            for _ in range(args.repeat):
                run = await engine_bench.baseline(
                    engine, engine_bench.pipeline_run, pipe, 1, words, args.new_tokens, next(fresh)
                )
                rates["pipeline"].append(run.tokens_per_s)
                await engine_bench.engine_run(engine, 1, words, args.new_tokens, next(fresh))
                for side in [*SIDES[:2], *SIDES[1::-1]]:  # kept, paged, paged, kept
                    with paged_read_only() if side == "paged read" else nullcontext():
                        run = await engine_bench.engine_run(
                            engine, 1, words, args.new_tokens, next(fresh)
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
