"""Engine benchmark: the continuous-batching engine against one-at-a-time pipeline calls.

Prints figures; asserts nothing about speed. Both sides run in the same process on the same
model, side by side, so the ratio is what to read.

    # CPU proxy (every machine): tiny EXAONE-shaped model, 16 concurrent questions
    python -m tests.benchmarks.engine_bench --size tiny --concurrency 16

    # GPU: full-size EXAONE-3.5-2.4B shape, random bf16 weights (no download)
    python -m tests.benchmarks.engine_bench --size full --device cuda --concurrency 1,8,32

The model is EXAONE 3.5's config translated to Llama (as the loader does) with random weights,
and a word-level tokenizer covering the whole vocabulary, so every generated id is text and
time-to-first-token is measured where users see it. End-of-sequence is disabled on both sides so
every answer has exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from bot.llm.base import ChatMessage, Delta, Finished
from bot.llm.engine import BatchingEngine
from bot.llm.exaone import exaone_to_llama_config
from bot.llm.loader import LoadedModel
from bot.sampling import SamplingSettings
from tests.fixtures.tiny_exaone import (
    EXAONE_3_5_2_4B_CONFIG,
    EXAONE_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TINY_SHAPE,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def word_tokenizer(vocab_size: int) -> Any:
    """EXAONE's role tokens and chat template over a word per id, every id decoding to text.

    Random weights pick role tokens as often as any other, so they are added as ordinary tokens
    (still matched whole by the chat template) rather than as special ones skipped in decoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.chat_template = EXAONE_CHAT_TEMPLATE
    return fast


def build_model(size: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaForCausalLM

    raw = dict(EXAONE_3_5_2_4B_CONFIG)
    if size == "tiny":
        rope = dict(raw["rope_scaling"], original_max_position_embeddings=512)
        raw.update(TINY_SHAPE, vocab_size=512, rope_scaling=rope)
    config = exaone_to_llama_config(raw)
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    return model.to(dtype).eval()


@dataclass(frozen=True)
class InMemoryLoader:
    """A model built in memory instead of loaded from a directory (the engine's Loader)."""

    model: Any
    tokenizer: Any
    device: str
    name: str = "local:bench"
    context_tokens: int | None = None

    def load(self) -> LoadedModel:
        return LoadedModel(
            model=self.model,
            tokenizer=self.tokenizer,
            device=self.device,
            eos_token_ids=[-1],  # no end of sequence: fixed-length answers on both sides
            pad_token_id=0,
            context_window=int(self.model.config.max_position_embeddings),
        )


def in_memory_engine(model: Any, tokenizer: Any, device: str, **kwargs: Any) -> BatchingEngine:
    """The real engine over a model built in memory."""
    return BatchingEngine(InMemoryLoader(model, tokenizer, device), **kwargs)


def prompt(i: int, words: int) -> list[ChatMessage]:
    text = " ".join(f"w{100 + (i * 7 + j) % 400}" for j in range(words))
    return [
        {"role": "system", "content": "w20 w21 w22 w23"},
        {"role": "user", "content": text},
    ]


@dataclass
class Run:
    seconds: float
    tokens: int
    first_token_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def engine_run(engine: BatchingEngine, n: int, words: int, new_tokens: int) -> Run:
    sampling = SamplingSettings(do_sample=False, max_new_tokens=new_tokens)

    async def one(i: int) -> tuple[int, float]:
        encoded = await asyncio.to_thread(engine.encode, prompt(i, words))
        async for event in engine.stream(encoded, sampling):
            if isinstance(event, Finished):
                return event.completion_tokens, event.first_token_s or 0.0
        raise RuntimeError("stream ended without Finished")

    began = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    seconds = time.perf_counter() - began
    return Run(seconds, sum(t for t, _ in results), [f for _, f in results])


def pipeline_run(pipe: Any, n: int, words: int, new_tokens: int) -> Run:
    began = time.perf_counter()
    for i in range(n):
        pipe(
            prompt(i, words),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return Run(time.perf_counter() - began, n * new_tokens, [])


async def single_stream(engine: BatchingEngine, words: int, new_tokens: int) -> tuple[float, float]:
    """Decode tokens/s of one stream (after its first token), and its time to first token."""
    sampling = SamplingSettings(do_sample=False, max_new_tokens=new_tokens)
    encoded = await asyncio.to_thread(engine.encode, prompt(0, words))
    began = time.perf_counter()
    first = last = None
    count = 0
    async for event in engine.stream(encoded, sampling):
        if isinstance(event, Delta):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
    assert first is not None and last is not None
    return (count - 1) / max(last - first, 1e-9), first - began


async def main(args: argparse.Namespace) -> None:
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_model(args.size, device, dtype)
    tokenizer = word_tokenizer(int(model.config.vocab_size))
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"device: {name}; model: EXAONE-3.5-2.4B shape ({args.size}), {dtype}, random weights")
    print(f"torch {torch.__version__}; new tokens per answer: {args.new_tokens}")

    from transformers import pipeline

    pipe: Any = pipeline("text-generation", model=model, tokenizer=tokenizer)
    pipe(prompt(0, 8), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm it too

    engine = in_memory_engine(model, tokenizer, device, max_in_flight=1024)
    try:
        await measure(engine, pipe, args)
    finally:
        await engine.aclose()  # the engine's thread would otherwise keep the process alive


async def measure(engine: BatchingEngine, pipe: Any, args: argparse.Namespace) -> None:
    began = time.perf_counter()
    await engine.start()  # includes the engine's own warm-up
    print(f"engine start-up incl. warm-up: {time.perf_counter() - began:.1f}s", flush=True)

    rate, _ = await single_stream(engine, 16, args.new_tokens)
    ttfts = [
        (await single_stream(engine, args.ttft_prompt_words, 2))[1] for _ in range(args.repeat)
    ]
    print(f"single stream: {rate:.0f} tokens/s")
    print(
        f"time to first token, {args.ttft_prompt_words}-word prompt: "
        f"p50 {statistics.median(ttfts) * 1000:.1f} ms over {args.repeat} runs"
    )
    for n in args.concurrency:
        ours = await engine_run(engine, n, 16, args.new_tokens)
        theirs = pipeline_run(pipe, min(n, args.pipeline_max), 16, args.new_tokens)
        ratio = ours.tokens_per_s / theirs.tokens_per_s
        print(
            f"{n:3d} concurrent: engine {ours.tokens_per_s:8.0f} tokens/s "
            f"({ours.seconds:.2f}s for {ours.tokens} tokens); "
            f"pipeline one at a time {theirs.tokens_per_s:8.0f} tokens/s; ratio {ratio:.1f}x",
            flush=True,
        )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--concurrency", default="16", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ttft-prompt-words", type=int, default=500)  # ≈512 tokens with template
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--pipeline-max", type=int, default=16, help="pipeline calls per row (time-bounded)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
