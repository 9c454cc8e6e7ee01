"""The continuous-batching engine on the tiny EXAONE checkpoint: per-request sampling, streaming,
admission control, cancellation and engine failure (correctness, not speed)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from bot.conversation import ConversationKey
from bot.llm.base import BackendBusy, ChatMessage, Delta, Finished, Prompt
from bot.llm.chain import BackendState, LLMChain
from bot.llm.engine import BatchingEngine, IncrementalDecoder
from bot.llm.exaone import load_model_and_tokenizer
from bot.llm.loader import ModelLoader
from bot.sampling import SamplingSettings
from bot.service import Failure, SupportService, User
from bot.store import RedisStore
from tests.integration.test_local_backend import stream_while_the_tokenizer_is_held
from tests.support.backends import ScriptedLLM

pytestmark = pytest.mark.slow

MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are a support bot."},
    {"role": "user", "content": "배송은 언제 되나요? When will it ship?"},
]
GREEDY = SamplingSettings(do_sample=False, max_new_tokens=24)
HOT = SamplingSettings(temperature=1.8, top_k=400, top_p=1.0, max_new_tokens=24)


def batching(model_dir: Path, **options: Any) -> BatchingEngine:
    return BatchingEngine(ModelLoader(str(model_dir), device="cpu"), **options)


@pytest.fixture
async def engine(tiny_exaone_dir: Path) -> AsyncIterator[BatchingEngine]:
    llm = batching(tiny_exaone_dir, max_in_flight=8)
    await llm.start()
    yield llm
    await llm.aclose()


async def encoded(llm, messages: Sequence[ChatMessage] = MESSAGES) -> Prompt:
    """The prompt as the service makes it: encoded once, off the event loop."""
    return await asyncio.to_thread(llm.encode, messages)


async def collect(llm, sampling, messages: Sequence[ChatMessage] = MESSAGES):
    parts: list[str] = []
    finished = None
    async for event in llm.stream(await encoded(llm, messages), sampling):
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            finished = event
    assert isinstance(finished, Finished)
    return "".join(parts), finished


def reference_greedy(model_dir: Path, messages, max_new_tokens: int) -> tuple[list[int], str]:
    model, tokenizer = load_model_and_tokenizer(model_dir, "cpu", torch.float32)
    generator: Any = model  # generate() is not on the declared type
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    end = tokenizer.convert_tokens_to_ids("[|endofturn|]")
    out = generator.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[end]
    )
    new = out[0, len(ids) :].tolist()
    return new, str(tokenizer.decode(new, skip_special_tokens=True))


async def greedy_answers_then_close(
    llm: BatchingEngine, prompts: Sequence[Sequence[ChatMessage]], tokens: int
) -> list[str]:
    """Every prompt answered greedily, all at once; the engine is closed after."""
    sampling = SamplingSettings(do_sample=False, max_new_tokens=tokens)
    try:
        results = await asyncio.gather(*(collect(llm, sampling, m) for m in prompts))
    finally:
        await llm.aclose()
    return [text for text, _ in results]


async def test_greedy_channel_equals_greedy_decoding_beside_a_sampling_channel(
    engine, tiny_exaone_dir
):
    tokens, expected = reference_greedy(tiny_exaone_dir, MESSAGES, GREEDY.max_new_tokens)
    results = await asyncio.gather(
        collect(engine, GREEDY), collect(engine, HOT), collect(engine, HOT), collect(engine, GREEDY)
    )
    (greedy_text, greedy_done), (hot1, _), (hot2, _), (greedy_again, _) = results
    assert greedy_text == expected and greedy_again == expected
    assert greedy_done.completion_tokens == len(tokens)
    assert hot1 != expected or hot2 != expected  # sampling really sampled beside the greedy run


async def test_long_prompts_prefilled_in_chunks_beside_short_ones_equal_greedy_decoding(
    tiny_exaone_dir,
):
    """Prompts longer than a CPU step (512 prompt tokens here) are prefilled in chunks, a later
    chunk attending to the keys before it (bot.llm.cpu_attention's end-aligned causal case)
    while other requests decode in the same steps: every answer still equals `generate`'s."""
    long_a: list[ChatMessage] = [MESSAGES[0], {"role": "user", "content": "배송 " * 150 + "?"}]
    long_b: list[ChatMessage] = [MESSAGES[0], {"role": "user", "content": "Where? " * 180}]
    prompts = [long_a, MESSAGES, long_b, MESSAGES]
    engine = batching(tiny_exaone_dir, cpu_step_tokens=512)
    await engine.start()
    lengths = [len((await encoded(engine, m)).ids or []) for m in (long_a, long_b)]
    assert min(lengths) > 512 and max(lengths) < 2000, lengths
    expected = [reference_greedy(tiny_exaone_dir, m, 16)[1] for m in prompts]
    assert await greedy_answers_then_close(engine, prompts, 16) == expected


def requests_decoded_together(monkeypatch) -> list[int]:
    """Records, for each layer call of a step decoded as one row of keys per request
    (bot.llm.cpu_attention), how many requests it decoded together."""
    from bot.llm import cpu_attention

    counts: list[int] = []
    real = cpu_attention._decode_in_rows

    def counted(query, *args):
        counts.append(query.shape[2])  # [1, heads, requests, head_dim]
        return real(query, *args)

    monkeypatch.setattr(cpu_attention, "_decode_in_rows", counted)
    return counts


async def test_questions_of_different_lengths_decoded_in_one_padded_call_equal_greedy_decoding(
    tiny_exaone_dir, monkeypatch
):
    """Steps where every request decodes read their keys as padded rows and attend in one call
    (bot.llm.cpu_attention): each answer still equals `generate`'s for its own prompt."""
    padded_steps = requests_decoded_together(monkeypatch)
    prompts: list[list[ChatMessage]] = [
        [MESSAGES[0], {"role": "user", "content": "Where is my order? " * n}] for n in (3, 5, 6, 8)
    ]
    expected = [reference_greedy(tiny_exaone_dir, m, 20)[1] for m in prompts]
    engine = batching(tiny_exaone_dir)
    await engine.start()
    assert await greedy_answers_then_close(engine, prompts, 20) == expected
    assert max(padded_steps) == len(prompts)  # all four decoded together, in one call per layer


def lone_steps(monkeypatch) -> list[tuple[str, str]]:
    """Records each step in which one request decoded alone from its kept keys
    (bot.llm.lone_decode): the request, and "copy" when its keys were copied from the cache's
    read, "append" when transformers only wrote the new token."""
    from bot.llm.lone_decode import LoneDecode

    steps: list[tuple[str, str]] = []
    real = LoneDecode.begin

    def recorded(self, *args):
        used = real(self, *args)
        if used:
            steps.append((self._request, "append" if self.appending else "copy"))
        return used

    monkeypatch.setattr(LoneDecode, "begin", recorded)
    return steps


async def test_one_question_alone_decodes_from_kept_keys_and_equals_greedy_decoding(
    tiny_exaone_dir, monkeypatch
):
    """A question decoding alone copies its keys from the paged cache once, then appends each
    new token; its buffers outgrow their first room (256 tokens past the prompt) on the way."""
    steps = lone_steps(monkeypatch)
    tokens, expected = reference_greedy(tiny_exaone_dir, MESSAGES, 300)
    assert len(tokens) == 300  # long enough to grow the buffers
    engine = batching(tiny_exaone_dir)
    await engine.start()
    steps.clear()  # the warm-up's
    try:
        text, done = await collect(engine, SamplingSettings(do_sample=False, max_new_tokens=300))
    finally:
        await engine.aclose()
    assert text == expected
    # The prompt's step makes the first token; the first decoding step copies, the rest append.
    kinds = [kind for _, kind in steps]
    assert kinds == ["copy"] + ["append"] * (done.completion_tokens - 2)
    assert len({request for request, _ in steps}) == 1


async def test_a_question_joined_and_left_again_copies_its_keys_afresh_and_equals_greedy(
    tiny_exaone_dir, monkeypatch
):
    """A lone question is joined by another (its kept keys dropped: steps with two requests read
    the paged cache), then decodes alone again once the other is answered: both answers still
    equal `generate`'s."""
    steps = lone_steps(monkeypatch)
    other: list[ChatMessage] = [MESSAGES[0], {"role": "user", "content": "Where is my order?"}]
    _, expected_long = reference_greedy(tiny_exaone_dir, MESSAGES, 300)
    _, expected_short = reference_greedy(tiny_exaone_dir, other, 10)
    engine = batching(tiny_exaone_dir)
    await engine.start()
    steps.clear()  # the warm-up's
    try:
        stream = engine.stream(
            await encoded(engine), SamplingSettings(do_sample=False, max_new_tokens=300)
        )
        parts: list[str] = []
        async for event in stream:
            if isinstance(event, Delta):
                parts.append(event.text)
            if len(parts) == 20:
                break
        brief = SamplingSettings(do_sample=False, max_new_tokens=10)
        short, _ = await collect(engine, brief, other)
        async for event in stream:
            if isinstance(event, Delta):
                parts.append(event.text)
    finally:
        await engine.aclose()
    assert short == expected_short
    assert "".join(parts) == expected_long
    first = steps[0][0]  # the long question: alone, joined, then alone again
    assert [kind for request, kind in steps if request == first].count("copy") == 2
    assert steps[-1] == (first, "append")


async def test_as_many_questions_as_the_engine_admits_fit_its_cache_on_a_cpu(
    tiny_exaone_dir, monkeypatch
):
    """The CPU cache holds LLM_MAX_QUEUE questions of 512 tokens: 40 different questions of ~350
    tokens (two cache pages each) are all decoded in the same steps. With too small a cache the
    last ones wait for the first to finish (or are evicted and prefilled again), and then run
    nearly alone: a whole step's cost per token for a handful of questions."""
    decoding_together = requests_decoded_together(monkeypatch)
    questions: list[list[ChatMessage]] = [
        [MESSAGES[0], {"role": "user", "content": f"Where is my order number {i}? " * 12}]
        for i in range(40)
    ]
    engine = batching(tiny_exaone_dir, max_in_flight=40)
    await engine.start()
    try:
        lengths = [len((await encoded(engine, q)).ids or []) for q in questions]
        assert min(lengths) > 256 and max(lengths) + 24 <= 512, lengths
        sampling = SamplingSettings(do_sample=False, max_new_tokens=24)
        results = await asyncio.gather(*(collect(engine, sampling, q) for q in questions))
    finally:
        await engine.aclose()
    assert len(results) == 40
    assert max(decoding_together) == 40


async def test_a_queue_bigger_than_memory_allows_gets_the_cache_memory_allows_and_says_so(
    tiny_exaone_dir, caplog
):
    """LLM_MAX_QUEUE=10,000,000 would want a cache of billions of tokens: the engine starts with
    the cache half the available memory holds, says so in one warning line, and answers."""
    engine = batching(tiny_exaone_dir, max_in_flight=10_000_000)
    caplog.set_level("WARNING", logger="bot.llm.engine")
    await engine.start()
    try:
        text, finished = await collect(engine, GREEDY)
        cache = engine.manager.batch_processor.cache
        held = cache.num_blocks * 256
    finally:
        await engine.aclose()
    assert finished.completion_tokens > 0 and text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "LLM_MAX_QUEUE" in warnings[0] and f"{held:,} tokens" in warnings[0]
    assert 64 * 256 <= held < 10_000_000 * 512


async def test_streamed_text_equals_the_decoded_answer(engine, tiny_exaone_dir):
    _, expected = reference_greedy(tiny_exaone_dir, MESSAGES, 40)
    text, _ = await collect(engine, SamplingSettings(do_sample=False, max_new_tokens=40))
    assert text == expected


def test_incremental_decoder_matches_full_decode_on_korean(tiny_exaone_dir):
    _, tokenizer = load_model_and_tokenizer(tiny_exaone_dir, "cpu", torch.float32)
    ids = tokenizer.encode(
        "안녕하세요, 배송 문의입니다. Shipping takes 3 days! 🚚", add_special_tokens=False
    )
    decoder = IncrementalDecoder(tokenizer)
    parts = [decoder.push(ids[:n]) for n in range(1, len(ids) + 1)]
    parts.append(decoder.flush(ids))
    assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in parts)


async def test_queue_bound_overflows_to_gpt_or_tells_the_user(tiny_exaone_dir):
    local = batching(tiny_exaone_dir, max_in_flight=2)
    gpt = ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt)
    await chain.start()
    try:
        slow = SamplingSettings(do_sample=False, max_new_tokens=200)
        prompt = await encoded(local)
        holders = [local.stream(prompt, slow) for _ in range(2)]
        for holder in holders:  # both slots taken and generating
            assert isinstance(await anext(holder), Delta)
        text, done = await collect(chain, GREEDY)
        assert done.backend == "test:gpt" and text.startswith("echo:")
        assert chain.status()[0].state is BackendState.READY  # capacity is not a fault
        chain.overflow_to_fallback = False
        with pytest.raises(BackendBusy) as info:
            await collect(chain, GREEDY)
        assert info.value.waiting == 2
        for holder in holders:
            await holder.aclose()
        assert local.in_flight == 0
        _, done = await collect(chain, GREEDY)
        assert done.backend.startswith("local:")
    finally:
        await chain.aclose()


async def test_a_request_whose_channel_is_gone_is_cancelled(engine):
    prompt = await encoded(engine)
    stream = engine.stream(prompt, SamplingSettings(do_sample=False, max_new_tokens=500))
    assert isinstance(await anext(stream), Delta)
    await stream.aclose()
    assert engine.in_flight == 0
    scheduler = engine.manager.batch_processor.scheduler
    for _ in range(100):  # the engine thread drops it at its next step
        if not scheduler.active_requests and not scheduler.waiting_requests:
            break
        await asyncio.sleep(0.02)
    assert not scheduler.active_requests and not scheduler.waiting_requests
    text, _ = await collect(engine, GREEDY)  # and the engine goes on serving
    assert text


async def test_engine_failure_moves_waiting_requests_to_gpt(tiny_exaone_dir):
    local = batching(tiny_exaone_dir, max_in_flight=8)
    gpt = ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt)
    await chain.start()
    try:
        model = local.loaded.model

        def out_of_memory(*_args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        model.model.layers[0].register_forward_hook(out_of_memory)
        results = await asyncio.gather(*(collect(chain, GREEDY) for _ in range(4)))
        assert [done.backend for _, done in results] == ["test:gpt"] * 4
        # The engine is down now: later questions go straight to GPT too.
        _, done = await collect(chain, GREEDY)
        assert done.backend == "test:gpt"
    finally:
        await chain.aclose()


async def test_no_growth_after_many_requests(engine):
    router = engine.manager.output_router
    for _ in range(3):
        await asyncio.gather(*(collect(engine, GREEDY) for _ in range(6)))
    prompt = await encoded(engine)
    stream = engine.stream(prompt, SamplingSettings(do_sample=False, max_new_tokens=500))
    await anext(stream)
    await stream.aclose()
    await asyncio.sleep(0.05)
    assert engine.in_flight == 0
    assert router.output_queue.qsize() == 0
    assert len(router.result_handlers) <= 1  # only the cancelled one, dropped a moment later


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_run_generation_loop" in t.name]


async def test_outputs_that_come_before_the_consumer_reads_are_not_lost(engine, tiny_exaone_dir):
    """B6: the result handler is in place before the request is added. Here registering it
    blocks for a second (a busy loop, a preempted thread), long enough for the engine to finish
    the whole answer: with the handler registered after add_request, every output would land in
    the shared queue and the stream would wait forever."""
    _, expected = reference_greedy(tiny_exaone_dir, MESSAGES, 8)
    manager = engine.manager
    register = manager.register_result_handler

    def slow_register(request_id: str, callback: Any) -> None:
        time.sleep(1.0)
        register(request_id, callback)

    manager.register_result_handler = slow_register
    try:
        settings = SamplingSettings(do_sample=False, max_new_tokens=8)
        text, _ = await asyncio.wait_for(collect(engine, settings), 10)
    finally:
        del manager.register_result_handler
    assert text == expected
    assert manager.output_router.output_queue.qsize() == 0


async def test_a_busy_tokenizer_never_blocks_the_event_loop(engine, tiny_exaone_dir):
    """B5: while another thread holds the tokenizer (encoding a long prompt for the next
    question, say), streams go on and the loop is never blocked waiting for it."""
    _, expected = reference_greedy(tiny_exaone_dir, MESSAGES, 8)
    text, _ = await stream_while_the_tokenizer_is_held(engine, await encoded(engine))
    assert text == expected


async def test_a_prompt_without_ids_is_encoded_off_the_loop(engine, tiny_exaone_dir):
    # Encoded by GPT (no ids) while the local model's circuit was open, then tried locally.
    _, expected = reference_greedy(tiny_exaone_dir, MESSAGES, 8)
    prompt = Prompt(MESSAGES, tokens=0, ids=None)
    text, _ = await stream_while_the_tokenizer_is_held(engine, prompt, hold_s=0.3)
    assert text == expected


async def test_a_failed_warm_up_leaves_gpt_answering_and_frees_the_engine(
    tiny_exaone_dir, monkeypatch, caplog
):
    """B3: the warm-up answer fails (a CUDA out-of-memory in the first step): start-up goes on
    with GPT, and the engine's thread is stopped at once."""

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    local, gpt = batching(tiny_exaone_dir), ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt)
    with monkeypatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "forward", out_of_memory)
        await chain.start()
    try:
        primary, fallback = chain.status()
        assert primary.state is BackendState.UNAVAILABLE and "out of memory" in primary.detail
        assert fallback.state is BackendState.READY
        assert local.manager is None and engine_threads() == []
        _, done = await collect(chain, GREEDY)
        assert done.backend == "test:gpt"
    finally:
        await chain.aclose()


async def test_a_warm_up_slower_than_its_timeout_leaves_gpt_answering(tiny_exaone_dir, monkeypatch):
    original = LlamaForCausalLM.forward

    def slow_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    local = batching(tiny_exaone_dir, warmup_timeout_s=0.1)
    chain = LLMChain(local, ScriptedLLM(label="gpt"))
    with monkeypatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "forward", slow_forward)
        began = time.monotonic()
        await chain.start()
    try:
        assert time.monotonic() - began < 5
        primary = chain.status()[0]
        assert primary.state is BackendState.UNAVAILABLE and "warm-up" in primary.detail
        assert engine_threads() == []
    finally:
        await chain.aclose()


# -- per-request sampling: a tiny temperature, greedy without processors, top-k/top-p --------


async def test_a_tiny_temperature_is_greedy_and_fails_no_one_beside_it(engine, tiny_exaone_dir):
    """Issue 12: temperature 1e-320 (inside the contract's 0 < t <= 2) made the step's
    probabilities inf/NaN, which failed every request in the batch. Now it is decoded greedily
    (the limit as t -> 0) and the requests beside it sample as before."""
    _, expected = reference_greedy(tiny_exaone_dir, MESSAGES, GREEDY.max_new_tokens)
    tiny = SamplingSettings(temperature=1e-320, max_new_tokens=GREEDY.max_new_tokens)
    results = await asyncio.gather(
        collect(engine, tiny),
        collect(engine, HOT),
        collect(engine, SamplingSettings(temperature=1e-30, max_new_tokens=24)),
        collect(engine, GREEDY),
        collect(engine, HOT),
    )
    texts = [text for text, _ in results]
    assert texts[0] == texts[2] == texts[3] == expected
    assert all(done.backend.startswith("local:") for _, done in results)


async def test_one_channel_at_1e_320_and_another_keep_local_answers(tiny_exaone_dir, redis):
    """Issue 12 through the service: one channel sets temperature 1e-320, another keeps the
    defaults; with no fallback, any engine failure would reach a user. Every question of both
    is answered by the local model, and `show` says the tiny temperature is decoded greedily."""
    local = batching(tiny_exaone_dir, max_in_flight=8)
    store = RedisStore(
        redis,
        defaults=SamplingSettings(max_new_tokens=12),
        max_new_tokens_limit=64,
        max_messages=40,
        ttl_seconds=3600,
    )
    svc = SupportService(store=store, llm=LLMChain(local), persona="You are a support bot.")
    await svc.llm.start()
    try:
        cold = ConversationKey("slack", "T1", "C-cold")
        other = ConversationKey("slack", "T1", "C-default")
        admin = User("U1", can_configure=True)
        reply = await svc.settings(cold, admin, "temperature 1e-320")
        assert reply.startswith("Updated: temperature=1e-320")
        assert "below 0.001, the local model decodes greedily" in reply

        async def ask(key: ConversationKey, n: int) -> str:
            events = [e async for e in svc.ask(key, admin, f"question {n}")]
            assert not [e for e in events if isinstance(e, Failure)], events
            last = events[-1]
            assert isinstance(last, Finished) and last.backend.startswith("local:")
            return "".join(e.text for e in events if isinstance(e, Delta))

        for round_ in range(3):
            answers = await asyncio.gather(ask(cold, round_), ask(other, round_))
            assert all(answers)
        show = await svc.settings(other, admin, "show")
        assert "decodes greedily" not in show
    finally:
        await svc.llm.aclose()


async def test_greedy_only_batches_run_no_sampling_work(engine, monkeypatch):
    """Greedy requests take transformers' argmax with no processor: RequestSampler draws only
    for rows that sample (it used to be top_k=1, a full-vocabulary sort per token)."""
    from bot.llm import sampler

    draws: list[int] = []
    real_draw = sampler._draw

    def counted(scores: torch.Tensor, args: torch.Tensor, k: int) -> torch.Tensor:
        draws.append(int(scores.size(0)))
        return real_draw(scores, args, k)

    monkeypatch.setattr(sampler, "_draw", counted)
    await asyncio.gather(*(collect(engine, GREEDY) for _ in range(3)))
    assert draws == []
    await asyncio.gather(collect(engine, GREEDY), collect(engine, HOT), collect(engine, GREEDY))
    assert draws and max(draws) == 1  # only the sampling row, never the greedy ones


async def test_top_k_1_and_a_tiny_top_p_sample_only_the_best_token(engine, tiny_exaone_dir):
    _, expected = reference_greedy(tiny_exaone_dir, MESSAGES, GREEDY.max_new_tokens)
    hot_top1 = SamplingSettings(temperature=2.0, top_k=1, top_p=1.0, max_new_tokens=24)
    hot_p = SamplingSettings(temperature=2.0, top_k=1000, top_p=1e-9, max_new_tokens=24)
    results = await asyncio.gather(collect(engine, hot_top1), collect(engine, hot_p))
    assert [text for text, _ in results] == [expected, expected]


async def test_the_model_loads_and_the_engine_starts_on_threads_that_end(
    tiny_exaone_dir, monkeypatch
):
    """Loading and starting run torch on a CPU; a thread that lives on keeps its OpenMP team,
    and a team beside the engine's slows every decode step (bot/ops/threads.py)."""
    threads: list[threading.Thread] = []

    def recorded(real):
        def run(*args, **kwargs):
            threads.append(threading.current_thread())
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(ModelLoader, "load", recorded(ModelLoader.load))
    monkeypatch.setattr(BatchingEngine, "_start_manager", recorded(BatchingEngine._start_manager))
    llm = batching(tiny_exaone_dir)
    await llm.start()
    try:
        assert len(threads) == 2
        for thread in threads:
            thread.join(timeout=5)
            assert not thread.is_alive(), thread.name
        assert (await collect(llm, GREEDY))[0]
    finally:
        await llm.aclose()
