"""SupportService over real Redis with our own instant backends: prompt, history, order,
fallback, circuit breaker, and the messages users see."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from bot.conversation import ConversationKey, Message
from bot.llm.base import BackendFailed, BackendTimeout, Delta, Finished
from bot.llm.chain import Backend, BackendState, LLMChain
from bot.service import Failure, User, clean_question
from tests.conftest import DEFAULTS, make_service
from tests.support.backends import ScriptedLLM

KEY = ConversationKey("slack", "T1", "C1")
USER = User("U1")


async def collect(service, key, text, user=USER):
    events = [e async for e in service.ask(key, user, text)]
    text_out = "".join(e.text for e in events if isinstance(e, Delta))
    return events, text_out


async def test_prompt_is_persona_history_question_and_both_turns_are_stored(redis):
    llm = ScriptedLLM()
    svc = make_service(redis, llm, persona="너는 쇼핑몰 Q&A 챗봇이야.")
    await svc.llm.start()
    events, text = await collect(svc, KEY, "  배송은 언제 되나요?  ")
    assert text == "echo: 배송은 언제 되나요?"
    assert isinstance(events[-1], Finished) and events[-1].backend == "test:scripted"
    await collect(svc, KEY, "second")
    assert llm.calls[1].messages == [
        {"role": "system", "content": "너는 쇼핑몰 Q&A 챗봇이야."},
        {"role": "user", "content": "배송은 언제 되나요?"},
        {"role": "assistant", "content": "echo: 배송은 언제 되나요?"},
        {"role": "user", "content": "second"},
    ]
    assert await svc.store.history(KEY) == [
        Message("user", "배송은 언제 되나요?"),
        Message("assistant", "echo: 배송은 언제 되나요?"),
        Message("user", "second"),
        Message("assistant", "echo: second"),
    ]


async def test_channel_settings_reach_the_backend(redis):
    llm = ScriptedLLM()
    svc = make_service(redis, llm)
    await svc.llm.start()
    await svc.settings(KEY, User("A", can_configure=True), "temperature 0.8 do_sample off")
    await collect(svc, KEY, "hi")
    assert llm.calls[-1].sampling.temperature == 0.8
    assert llm.calls[-1].sampling.do_sample is False
    assert llm.calls[-1].sampling.top_k == DEFAULTS.top_k


async def test_history_is_trimmed_into_the_context(redis):
    llm = ScriptedLLM(context_window=120)  # DEFAULTS.max_new_tokens = 64 → 56 prompt tokens
    svc = make_service(redis, llm)
    await svc.llm.start()
    for i in range(6):
        await collect(svc, KEY, f"question number {i} " + "pad " * 5)
    prompt = llm.calls[-1].messages
    assert llm.encode(prompt).tokens <= 120 - DEFAULTS.max_new_tokens
    assert prompt[0]["role"] == "system" and prompt[-1]["content"].startswith("question number 5")
    assert len(prompt) < 12  # older turns were dropped


async def test_thread_scope_keeps_threads_apart_and_channel_scope_joins_them(redis):
    for scope, expect_shared in (("channel", True), ("thread", False)):
        await redis.flushdb()
        llm = ScriptedLLM()
        svc = make_service(redis, llm, scope=scope)
        await svc.llm.start()
        await collect(svc, ConversationKey("slack", "T1", "C1", thread="1.1"), "in thread one")
        await collect(svc, ConversationKey("slack", "T1", "C1", thread="2.2"), "in thread two")
        seen = [m["content"] for m in llm.calls[-1].messages]
        assert ("in thread one" in seen) is expect_shared


async def test_turns_of_one_channel_run_in_order_and_channels_run_concurrently(redis):
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    class Slow(ScriptedLLM):
        async def stream(self, prompt, sampling):
            channel = prompt.messages[-1]["content"].split(":")[0]
            running[channel] = running.get(channel, 0) + 1
            peak[channel] = max(peak.get(channel, 0), running[channel])
            try:
                await asyncio.sleep(0.05)
                async for event in super().stream(prompt, sampling):
                    yield event
            finally:
                running[channel] -= 1

    llm = Slow()
    svc = make_service(redis, llm)
    await svc.llm.start()
    keys = {c: ConversationKey("slack", "T1", c) for c in ("A", "B", "C")}
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(collect(svc, keys[c], f"{c}:{i}") for i in range(5) for c in keys))
    elapsed = asyncio.get_running_loop().time() - started
    assert all(p == 1 for p in peak.values())  # never two turns of a channel at once
    assert elapsed < 5 * 0.05 * 3  # channels overlapped
    for c, key in keys.items():
        history = await svc.store.history(key)
        assert [m.content for m in history] == [
            text for i in range(5) for text in (f"{c}:{i}", f"echo: {c}:{i}")
        ]
    assert svc.active_conversations == 0  # per-conversation locks are released


async def test_fallback_when_local_cannot_load(redis):
    gpt = ScriptedLLM(label="gpt")
    svc = make_service(redis, ScriptedLLM(fail_start="cannot load model"), gpt)
    await svc.llm.start()
    events, text = await collect(svc, KEY, "hi")
    assert text == "echo: hi" and events[-1].backend == "test:gpt"


@pytest.mark.parametrize(
    "broken",
    [
        ScriptedLLM(raise_error=BackendFailed("CUDA out of memory")),
        ScriptedLLM(raise_error=RuntimeError("unexpected bug")),
        ScriptedLLM(hang_s=5),
    ],
    ids=["raises", "raises-unexpected", "hangs"],
)
async def test_fallback_when_local_raises_or_times_out(redis, broken):
    gpt = ScriptedLLM(label="gpt")
    svc = make_service(redis, None, chain=LLMChain(Backend(broken, stall_timeout_s=0.2), gpt))
    await svc.llm.start()
    events, text = await collect(svc, KEY, "hi")
    assert text == "echo: hi" and events[-1].backend == "test:gpt"
    assert await svc.store.history(KEY) == [Message("user", "hi"), Message("assistant", "echo: hi")]


async def test_failure_after_text_is_reported_not_spliced(redis, caplog):
    gpt = ScriptedLLM(label="gpt")
    svc = make_service(redis, ScriptedLLM(raise_after_text=BackendTimeout("stalled")), gpt)
    await svc.llm.start()
    with caplog.at_level(logging.ERROR):
        events, text = await collect(svc, KEY, "hi")
    assert text == "echo"  # the first chunk, then the failure
    failure = events[-1]
    assert isinstance(failure, Failure) and "cut off" in failure.message
    assert failure.error_id and failure.error_id in caplog.text
    assert gpt.calls == []
    assert await svc.store.history(KEY) == [Message("user", "hi")]  # the question is kept


async def test_nothing_configured_names_the_settings_and_has_an_error_id(redis, caplog):
    svc = make_service(redis, None, None)
    await svc.llm.start()
    with caplog.at_level(logging.ERROR):
        events, text = await collect(svc, KEY, "hi")
    assert text == ""
    (failure,) = events
    assert isinstance(failure, Failure) and failure.reason == "not_configured"
    assert "LLM_MODEL" in failure.message and "OPENAI_API_KEY" in failure.message
    assert "not set" in failure.message
    assert "Traceback" not in failure.message
    assert f"[error_id={failure.error_id}]" in caplog.text


async def test_a_configured_backend_that_failed_to_load_is_not_called_not_configured(redis, caplog):
    svc = make_service(redis, ScriptedLLM(fail_start="weights missing"), None)
    await svc.llm.start()
    with caplog.at_level(logging.ERROR):
        events, _ = await collect(svc, KEY, "hi")
    (failure,) = events
    assert isinstance(failure, Failure) and failure.reason == "no_backend"
    assert "not set" not in failure.message and "OPENAI_API_KEY" not in failure.message
    assert "No model is available" in failure.message and "weights missing" in failure.message
    assert f"[error_id={failure.error_id}]" in caplog.text and "weights missing" in caplog.text


async def test_both_backends_failing_gives_a_clear_message(redis):
    svc = make_service(
        redis,
        ScriptedLLM(raise_error=BackendFailed("oom")),
        ScriptedLLM(label="gpt", raise_error=BackendFailed("HTTP 500")),
    )
    await svc.llm.start()
    events, _ = await collect(svc, KEY, "hi")
    failure = events[-1]
    assert isinstance(failure, Failure) and failure.reason == "failed"
    assert "the model failed while answering" in failure.message
    assert "not set" not in failure.message and "OPENAI_API_KEY" not in failure.message
    assert await svc.store.history(KEY) == [Message("user", "hi")]


async def test_circuit_breaker_skips_a_broken_local_model_then_retries_it(redis):
    now = [0.0]
    local = ScriptedLLM(raise_error=BackendFailed("oom"))
    gpt = ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt, breaker_threshold=2, breaker_cooldown_s=30, clock=lambda: now[0])
    svc = make_service(redis, None, chain=chain)
    await svc.llm.start()
    for _ in range(5):
        await collect(svc, KEY, "q")
    assert len(local.calls) == 2  # opened after two failures; the next three went straight to GPT
    assert len(gpt.calls) == 5
    assert "circuit open" in await svc.settings(KEY, USER, "show")
    now[0] = 31.0  # cooldown over: one trial; the model works again, so the circuit closes
    local.raise_error = None
    events, _ = await collect(svc, KEY, "q")
    assert events[-1].backend == "test:scripted"
    assert svc.llm.status()[0].state is BackendState.READY


@pytest.mark.parametrize("text", ["", "   ", "\x00\x07", "\n\t\n"])
async def test_empty_questions_get_a_hint_and_store_nothing(service, redis, text):
    events, _ = await collect(service, KEY, text)
    assert len(events) == 1 and isinstance(events[0], Failure)
    assert events[0].error_id is None and "Ask me a question" in events[0].message
    assert await service.store.history(KEY) == []


def test_clean_question_drops_controls_and_lone_surrogates():
    assert clean_question("a\x00b\u0007c\ud800d\n e ") == "abc?d\n e"
    assert len(clean_question("x" * 100_000)) == 16_000


async def test_a_question_refused_as_too_long_leaves_the_history_as_it_was(redis):
    # B2: the refused question used to stay stored, so the next turn's prompt held only it.
    llm = ScriptedLLM(context_window=DEFAULTS.max_new_tokens + 40)
    svc = make_service(redis, llm)
    await svc.llm.start()
    await collect(svc, KEY, "short one")
    events, _ = await collect(svc, KEY, "long " * 200)
    assert isinstance(events[-1], Failure) and "too long" in events[-1].message
    assert await svc.store.history(KEY) == [
        Message("user", "short one"),
        Message("assistant", "echo: short one"),
    ]
    await collect(svc, KEY, "next")
    assert [m["content"] for m in llm.calls[-1].messages[1:]] == [
        "short one",
        "echo: short one",
        "next",
    ]


async def test_the_prompt_is_encoded_off_the_event_loop_and_once(redis):
    loop_thread = threading.get_ident()
    threads: list[int] = []

    class Recording(ScriptedLLM):
        def encode(self, messages):
            threads.append(threading.get_ident())
            return super().encode(messages)

    llm = Recording()
    svc = make_service(redis, llm)
    await svc.llm.start()
    await collect(svc, KEY, "hi")
    assert len(threads) == 1 and threads[0] != loop_thread


async def test_admit_runs_under_the_turn_lock_in_arrival_order(redis):
    # B8: a front door's claim runs inside ask(), after the conversation's FIFO lock, so a slow
    # claim for the first mention cannot let the second one be answered (and stored) first.
    llm = ScriptedLLM()
    svc = make_service(redis, llm)
    await svc.llm.start()
    delays = {"first": 0.1, "second": 0.0}

    def admit_after(text):
        async def admit():
            await asyncio.sleep(delays[text])
            return True

        return admit

    async def ask(text):
        return [e async for e in svc.ask(KEY, USER, text, admit=admit_after(text))]

    await asyncio.gather(ask("first"), ask("second"))
    assert [m.content for m in await svc.store.history(KEY)] == [
        "first",
        "echo: first",
        "second",
        "echo: second",
    ]


async def test_a_turn_not_admitted_says_and_stores_nothing(redis):
    llm = ScriptedLLM()
    svc = make_service(redis, llm)
    await svc.llm.start()

    async def refuse():
        return False

    assert [e async for e in svc.ask(KEY, USER, "dup", admit=refuse)] == []
    assert await svc.store.history(KEY) == [] and llm.calls == []
