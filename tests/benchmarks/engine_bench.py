"""Engine benchmark: the continuous-batching engine against the seed's one-at-a-time pipeline
and against static batching (one `generate` call for the whole batch).

Prints figures; asserts nothing about speed. The three sides run in the same process on the same
model, interleaved (the side that runs first alternates), --repeat times each, with fresh prompts
every time (no prefix-cache hits); rows show min/median/max and the ratios of the medians.

    # CPU proxy: EXAONE-3.5-shaped, 168 M parameters (hidden 1024, 12 layers, 8/2 heads, 32k vocab)
    python -m tests.benchmarks.engine_bench --size proxy --concurrency 1,4,16,32 --repeat 3

    # GPU: full-size EXAONE-3.5-2.4B shape, random bf16 weights (tests/benchmarks/gpu.sh)
    python -m tests.benchmarks.engine_bench --size full --device cuda --concurrency 1,32,64 --json

The model is EXAONE 3.5's config translated to Llama (as the loader does) with random weights,
and a word-level tokenizer covering the whole vocabulary, so every generated id is text and
time-to-first-token is measured where users see it. End-of-sequence is disabled on both sides so
every answer has exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from bot.llm.base import ChatMessage, Delta, Finished
from bot.llm.engine import BatchingEngine
from bot.llm.exaone import exaone_to_llama_config
from bot.llm.loader import LoadedModel
from bot.ops.threads import on_own_thread
from bot.sampling import SamplingSettings
from tests.fixtures.tiny_exaone import (
    EXAONE_3_5_2_4B_CONFIG,
    EXAONE_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TINY_SHAPE,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = TypeVar("T")


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


# A CPU-sized EXAONE 3.5: the 2.4B model's proportions (GQA 4:1, MLP 2.8x) at 168 M parameters.
PROXY_SHAPE = {
    "hidden_size": 1024,
    "num_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "intermediate_size": 2816,
    "vocab_size": 32000,
}


def build_model(size: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaForCausalLM

    raw = dict(EXAONE_3_5_2_4B_CONFIG)
    if size == "tiny":
        rope = dict(raw["rope_scaling"], original_max_position_embeddings=512)
        raw.update(TINY_SHAPE, vocab_size=512, rope_scaling=rope)
    elif size == "proxy":
        raw.update(PROXY_SHAPE)
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
    """Question i: distinct from every other i (below 900 million) from its first two words, so
    no run reuses the cache of an earlier one (the engine shares cached prefixes). The tiny
    model's 512-word vocabulary reads those two as unknown: its runs only check the harness."""
    unique = [f"w{1000 + i % 30000}", f"w{1000 + i // 30000 % 30000}"]
    filler = (f"w{100 + (i * 7919 + j * 31) % 400}" for j in range(2, words))
    text = " ".join([*unique[:words], *filler])
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


GREEDY_FIXED = {"do_sample": False, "pad_token_id": 0}


async def engine_run(
    engine: BatchingEngine, n: int, words: int, new_tokens: int, base: int = 0
) -> Run:
    sampling = SamplingSettings(do_sample=False, max_new_tokens=new_tokens)

    async def one(i: int) -> tuple[int, float]:
        encoded = await asyncio.to_thread(engine.encode, prompt(base + i, words))
        async for event in engine.stream(encoded, sampling):
            if isinstance(event, Finished):
                return event.completion_tokens, event.first_token_s or 0.0
        raise RuntimeError("stream ended without Finished")

    began = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    seconds = time.perf_counter() - began
    return Run(seconds, sum(t for t, _ in results), [f for _, f in results])


def pipeline_run(pipe: Any, n: int, words: int, new_tokens: int, base: int = 0) -> Run:
    """The seed's path: pipeline("text-generation"), one question after another."""
    began = time.perf_counter()
    for i in range(n):
        pipe(
            prompt(base + i, words),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            return_full_text=False,
            **GREEDY_FIXED,
        )
    return Run(time.perf_counter() - began, n * new_tokens, [])


def _expected_restart(record: logging.LogRecord) -> bool:
    return "Batch processor was not initialized" not in record.getMessage()


async def baseline(engine: BatchingEngine, work: Callable[..., T], *args: Any) -> T:
    """A baseline run as the seed ran it: on a CPU, nothing else holds OpenMP threads meanwhile.

    The baseline runs on a thread that ends with it, and the engine's generation thread is
    stopped meanwhile and started again after (each ends with its OpenMP team:
    bot/ops/threads.py says why that matters), so each side runs alone, as in its own process.
    On a GPU the engine stays up: its CUDA graphs would be captured again, and OpenMP does not
    matter there.
    """
    manager = engine.manager
    on_cpu = not engine.loaded.device.startswith("cuda")
    # A manager started again builds its batch processor on its first request; stop() warns
    # about it when none came meanwhile, which is expected here.
    logging.getLogger("ContinuousBatchingLogger").addFilter(_expected_restart)
    if on_cpu:
        await asyncio.to_thread(manager.stop, block=True, timeout=30)
    try:
        return await on_own_thread(work, *args)
    finally:
        if on_cpu:
            manager.start()


async def warmed_engine_run(
    engine: BatchingEngine, n: int, words: int, new_tokens: int, base: int
) -> Run:
    """An engine run as a bot that has been answering questions of this size would make it.

    A generation thread that is new (each baseline restarts it on a CPU) runs its first steps of
    a given size of prompts ~15 % slower (16 x ~260-token questions: 80-87 tokens/s, then
    96-103), while the baselines, each on a new thread too, run their first call at full
    speed (static `generate`: 105 then 106): so the engine first answers the same number of
    fresh questions of the same length with 2 tokens, untimed. A running bot's thread has
    seen such steps before.
    """
    if not engine.loaded.device.startswith("cuda"):
        await engine_run(engine, n, words, 2, base=base + 500_000_000)
    return await engine_run(engine, n, words, new_tokens, base)


def static_run(model: Any, tokenizer: Any, n: int, words: int, new_tokens: int, base: int) -> Run:
    """Static batching: the n prompts left-padded into one `generate` call (the best case for a
    batch that arrives together and ends together)."""
    rows = [
        tokenizer.apply_chat_template(
            prompt(base + i, words), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for i in range(n)
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    began = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            **GREEDY_FIXED,
        )
    return Run(time.perf_counter() - began, n * new_tokens, [])


async def single_stream(
    engine: BatchingEngine, words: int, new_tokens: int, base: int
) -> tuple[float, float]:
    """Decode ms per token of one stream (after its first token), and its time to first token."""
    sampling = SamplingSettings(do_sample=False, max_new_tokens=new_tokens)
    encoded = await asyncio.to_thread(engine.encode, prompt(base, words))
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
    return (last - first) * 1000 / max(count - 1, 1), first - began


def static_cache_single_stream(
    model: Any, tokenizer: Any, words: int, new_tokens: int, base: int, compiled: bool
) -> float:
    """Decode ms per token of `generate` with a static cache, one question (torch.compile'd
    when `compiled`, as on a GPU): the single-stream reference the engine is held to."""
    ids = tokenizer.apply_chat_template(
        prompt(base, words), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    options: dict[str, Any] = {"cache_implementation": "static", **GREEDY_FIXED}
    if not compiled:
        options["disable_compile"] = True

    def run(tokens: int) -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=torch.tensor([ids], device=model.device),
                max_new_tokens=tokens, min_new_tokens=tokens, **options,
            )  # fmt: skip
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    run(new_tokens)  # compiles (or warms up) first
    # The difference between a long and a 2-token answer is the decode time alone.
    return (run(new_tokens) - run(2)) * 1000 / (new_tokens - 2)


def memory_bandwidth(device: str) -> float:
    """Bytes/s of a large copy on this device (read + write), best of five."""
    x = torch.empty(64 * 2**20 // 4 * 4, dtype=torch.float32, device=device)  # 256 MiB
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        y.copy_(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return 2 * x.numel() * x.element_size() / best


def ints(text: str) -> list[int]:
    """A command-line list: "1,4,16" -> [1, 4, 16]."""
    return [int(x) for x in text.split(",")]


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}/{statistics.median(values):.0f}/{max(values):.0f}"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = await on_own_thread(build_model, args.size, device, dtype)
    tokenizer = word_tokenizer(int(model.config.vocab_size))
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    params = sum(p.numel() for p in model.parameters())
    print(f"device: {name}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"model: EXAONE-3.5 shape ({args.size}), {params / 1e6:.0f} M parameters, {dtype}")
    print(f"new tokens per answer: {args.new_tokens}; repetitions: {args.repeat}", flush=True)

    from transformers import pipeline

    pipe: Any = await on_own_thread(pipeline, "text-generation", model=model, tokenizer=tokenizer)
    await on_own_thread(pipeline_run, pipe, 1, 8, 2, 0)  # warm both baselines up too
    await on_own_thread(static_run, model, tokenizer, 2, 8, 2, 0)

    # The queue as a deployment sets it (LLM_MAX_QUEUE, default 64): on a CPU it sizes the cache.
    queue = max(64, *args.concurrency)
    engine = in_memory_engine(model, tokenizer, device, max_in_flight=queue)
    try:
        return await measure(engine, pipe, model, tokenizer, params, args)
    finally:
        await engine.aclose()  # the engine's thread would otherwise keep the process alive


async def measure(
    engine: BatchingEngine,
    pipe: Any,
    model: Any,
    tokenizer: Any,
    params: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    began = time.perf_counter()
    await engine.start()  # includes the engine's own warm-up
    print(f"engine start-up incl. warm-up: {time.perf_counter() - began:.1f}s", flush=True)
    fresh = iter(range(1000, 10**9, 997))  # a new prompt base for every run
    report: dict[str, Any] = {"device": args.device, "size": args.size, "params": params}

    # Single stream: ms/token and the memory-bandwidth roofline (every weight read per token).
    bandwidth = await on_own_thread(memory_bandwidth, args.device)
    weight_bytes = params * next(model.parameters()).element_size()
    ms = [(await single_stream(engine, 16, args.new_tokens, next(fresh)))[0] for _ in range(3)]
    per_token = statistics.median(ms)
    roofline = bandwidth / weight_bytes
    report.update(
        single_stream_tokens_per_s=1000 / per_token,
        bandwidth_gb_s=bandwidth / 1e9,
        roofline_fraction=(1000 / per_token) / roofline,
    )
    print(
        f"single stream: {1000 / per_token:.0f} tokens/s ({per_token:.1f} ms/token, min "
        f"{min(ms):.1f} max {max(ms):.1f}); memory bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"roofline {roofline:.0f} tokens/s -> {report['roofline_fraction']:.0%} of it"
    )
    if args.static_reference:
        compiled = args.device.startswith("cuda")
        reference_ms = await on_own_thread(
            static_cache_single_stream, model, tokenizer, 16, args.new_tokens, next(fresh), compiled
        )
        report["static_cache_generate_tokens_per_s"] = 1000 / reference_ms
        print(
            f"single stream, static-cache generate{' (compiled)' if compiled else ''}: "
            f"{1000 / reference_ms:.0f} tokens/s ({reference_ms:.1f} ms/token); engine/it "
            f"{reference_ms / per_token:.2f}x",
            flush=True,
        )
    ttfts = [
        (await single_stream(engine, args.long_words, 2, next(fresh)))[1] * 1000
        for _ in range(args.repeat)
    ]
    report["ttft_ms_long_prompt"] = statistics.median(ttfts)
    print(
        f"time to first token, fresh {args.long_words}-word prompt: min/median/max "
        f"{min(ttfts):.0f}/{statistics.median(ttfts):.0f}/{max(ttfts):.0f} ms",
        flush=True,
    )

    rows: dict[str, Any] = {}
    for words in args.words:
        for n in args.concurrency:
            rates: dict[str, list[float]] = {"engine": [], "pipeline": [], "static": []}
            for rep in range(args.repeat):
                sides = ["engine", "pipeline", "static"]
                order = sides[rep % 3 :] + sides[: rep % 3]  # each side goes first in turn
                for side in order:
                    base = next(fresh)
                    if side == "engine":
                        run = await warmed_engine_run(engine, n, words, args.new_tokens, base)
                    elif side == "pipeline":
                        calls = min(n, args.pipeline_max)
                        run = await baseline(
                            engine, pipeline_run, pipe, calls, words, args.new_tokens, base
                        )
                    else:
                        run = await baseline(
                            engine, static_run, model, tokenizer, n, words, args.new_tokens, base
                        )
                    rates[side].append(run.tokens_per_s)
            med = {side: statistics.median(v) for side, v in rates.items()}
            row = {
                **{f"{side}_tokens_per_s": v for side, v in rates.items()},
                "engine_vs_pipeline": med["engine"] / med["pipeline"],
                "engine_vs_static": med["engine"] / med["static"],
            }
            rows[f"{n}x{words}w"] = row
            print(
                f"{n:3d} concurrent, {words:3d}-word prompts: tokens/s min/median/max "
                f"engine {spread(rates['engine'])}, pipeline {spread(rates['pipeline'])}, "
                f"static generate {spread(rates['static'])}; engine/pipeline "
                f"{row['engine_vs_pipeline']:.2f}x, engine/static {row['engine_vs_static']:.2f}x",
                flush=True,
            )
    report["rows"] = rows
    varlen, decode = engine.manager.continuous_batching_config.cuda_graph_booleans
    report["cuda_graphs"] = bool(varlen or decode)
    report["attention"] = str(model.config._attn_implementation)
    if args.json:
        print(json.dumps(report))
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "proxy", "full"], default="proxy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", default="1,4,16,32", type=ints)
    parser.add_argument("--words", default="16,250", type=ints, help="prompt lengths (words)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long-words", type=int, default=500)  # ~512 tokens with the template
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--pipeline-max", type=int, default=4, help="pipeline calls per run (one at a time)"
    )
    parser.add_argument(
        "--static-reference",
        action="store_true",
        help="also time one stream of static-cache generate (compiled on CUDA)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
