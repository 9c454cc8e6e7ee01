"""LLMChain over scripted backends: typed status, one stall timeout per backend (B4), start-up
that survives any backend failure (B3), and a half-open trial that is cancelled (B1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import pytest

from bot.llm.base import (
    BackendFailed,
    ChatMessage,
    Delta,
    Finished,
    Prompt,
    RateLimited,
    RequestRejected,
)
from bot.llm.chain import Backend, BackendState, CircuitOpen, LLMChain, NoBackendAvailable
from bot.sampling import SamplingSettings
from tests.support.backends import ScriptedLLM

MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are a support bot."},
    {"role": "user", "content": "Is the deploy done?"},
]
SAMPLING = SamplingSettings(do_sample=False, max_new_tokens=8)


class Clock:
    """The circuit breakers' clock: the test moves it past the cooldown instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def answer(chain: LLMChain, messages: Sequence[ChatMessage] = MESSAGES) -> tuple[str, str]:
    """(text, backend) of one question, encoded off the loop as the service does it."""
    prompt = await asyncio.to_thread(chain.encode, messages)
    parts: list[str] = []
    async for event in chain.stream(prompt, SAMPLING):
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event.backend
    raise AssertionError("no Finished")


async def open_circuit(chain: LLMChain, local: ScriptedLLM, clock: Clock) -> None:
    """Two failures open the local model's circuit; then the cooldown passes (half-open)."""
    local.raise_error = BackendFailed("CUDA out of memory (simulated)")
    for _ in range(2):
        assert (await answer(chain))[1] == "test:gpt"
    assert chain.status()[0].state is BackendState.CIRCUIT_OPEN
    local.raise_error = None
    clock.now += 31


async def test_status_is_typed_and_answering_names_the_backend_that_answers() -> None:
    clock = Clock()
    local, gpt = (
        ScriptedLLM(label="local"),
        ScriptedLLM(label="gpt", unsupported=frozenset({"top_k"})),
    )
    chain = LLMChain(Backend(local, 5.0), Backend(gpt, 5.0), clock=clock)
    await chain.start()

    primary, fallback = chain.status()
    assert (primary.name, primary.role, primary.state, primary.detail) == (
        "test:local",
        "primary",
        BackendState.READY,
        "",
    )
    assert fallback.unsupported == frozenset({"top_k"}) and fallback.describe() == "ready"
    answering = chain.answering()
    assert answering is not None and answering.name == "test:local"
    assert chain.name == "test:local" and chain.context_window == 4096

    local.raise_error = BackendFailed("boom")
    for _ in range(2):
        await answer(chain)
    primary = chain.status()[0]
    assert primary.state is BackendState.CIRCUIT_OPEN and primary.usable
    assert primary.describe() == "circuit open after failures; retrying soon"
    answering = chain.answering()
    assert answering is not None and answering.name == "test:gpt"
    assert chain.unsupported == frozenset({"top_k"})  # sized and encoded for GPT now


async def test_encode_and_count_each_come_from_the_preferred_backend() -> None:
    chain = LLMChain(ScriptedLLM(label="local"), None)
    await chain.start()
    prompt = chain.encode(MESSAGES)
    assert prompt == Prompt(MESSAGES, tokens=(5 + 3) + (4 + 3), ids=None)
    assert chain.count_each(MESSAGES) == [5 + 3, 4 + 3]


async def test_no_usable_backend_raises_no_backend_available() -> None:
    chain = LLMChain(ScriptedLLM(fail_start="no weights"), None)
    await chain.start()
    assert chain.answering() is None and not chain.ready
    with pytest.raises(NoBackendAvailable, match="no weights"):
        chain.encode(MESSAGES)
    with pytest.raises(NoBackendAvailable, match="no weights"):
        chain.count_each(MESSAGES)
    with pytest.raises(NoBackendAvailable):
        _ = chain.context_window
    with pytest.raises(NoBackendAvailable, match="no backend configured"):
        LLMChain(None, None).encode(MESSAGES)


# -- B4: one stall timeout per backend --------------------------------------------------------


async def test_each_backend_has_its_own_stall_timeout() -> None:
    # The local model's timeout is short; GPT is slower than that but within its own.
    local = ScriptedLLM(label="local", hang_s=5.0)
    gpt = ScriptedLLM(label="gpt", hang_s=0.4)
    chain = LLMChain(Backend(local, stall_timeout_s=0.1), Backend(gpt, stall_timeout_s=3.0))
    await chain.start()

    loop = asyncio.get_running_loop()
    began = loop.time()
    text, backend = await answer(chain)
    assert backend == "test:gpt" and text == "echo: Is the deploy done?"
    assert loop.time() - began < 2.0  # the local model's 0.1 s, then GPT's answer


async def test_a_backend_past_its_own_stall_timeout_is_given_up() -> None:
    gpt = ScriptedLLM(label="gpt", hang_s=5.0)
    chain = LLMChain(None, Backend(gpt, stall_timeout_s=0.1))
    await chain.start()
    with pytest.raises(NoBackendAvailable, match=r"no output for 0\.1s"):
        await answer(chain)


# -- B3: start-up survives any backend failure ------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [BackendFailed("warm-up failed: CUDA out of memory"), RuntimeError("engine thread died")],
)
async def test_any_start_failure_leaves_the_backend_unavailable_and_gpt_answering(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    local, gpt = ScriptedLLM(label="local", start_error=error), ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt)

    with caplog.at_level(logging.INFO, logger="bot.llm.chain"):
        await chain.start()  # does not raise

    primary, fallback = chain.status()
    assert primary.state is BackendState.UNAVAILABLE and str(error) in primary.detail
    assert primary.describe().startswith("unavailable: ")
    assert fallback.state is BackendState.READY
    assert local.closed  # its memory and threads are freed at once
    assert not gpt.closed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(error) in warnings[0].getMessage()
    assert warnings[0].exc_info is None  # one line, no traceback
    assert await answer(chain) == ("echo: Is the deploy done?", "test:gpt")


# -- B1: a cancelled half-open trial ----------------------------------------------------------


async def test_a_cancelled_trial_call_lets_the_next_question_try_the_local_model() -> None:
    clock = Clock()
    local, gpt = ScriptedLLM(label="local"), ScriptedLLM(label="gpt")
    chain = LLMChain(Backend(local, 10.0), Backend(gpt, 10.0), clock=clock)
    await chain.start()
    await open_circuit(chain, local, clock)

    local.hang_s = 10.0  # the trial call is slow, and its task is cancelled (drain, shutdown)
    trial = asyncio.create_task(answer(chain))
    while len(local.calls) < 3:
        await asyncio.sleep(0.01)
    trial.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await trial

    local.hang_s = 0.0
    assert (await answer(chain))[1] == "test:local"  # a new trial, which closes the circuit
    assert chain.status()[0].state is BackendState.READY


async def test_a_trial_whose_consumer_leaves_lets_the_next_question_try_the_local_model() -> None:
    clock = Clock()
    local, gpt = ScriptedLLM(label="local", chunk_size=1), ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt, clock=clock)
    await chain.start()
    await open_circuit(chain, local, clock)

    prompt = chain.encode(MESSAGES)
    stream = chain.stream(prompt, SAMPLING)
    assert isinstance(await anext(stream), Delta)  # the trial has begun answering...
    await stream.aclose()  # ...and the channel is gone (GeneratorExit inside the chain)

    assert (await answer(chain))[1] == "test:local"
    assert chain.status()[0].state is BackendState.READY


@pytest.mark.parametrize(
    "refusal",
    [RequestRejected("HTTP 400 context_length_exceeded", too_long=True), RateLimited("HTTP 429")],
)
async def test_refused_requests_fall_back_but_never_open_the_circuit(refusal) -> None:
    local, gpt = ScriptedLLM(label="local"), ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt, breaker_threshold=2)
    await chain.start()
    local.raise_error = refusal
    for _ in range(3):  # more than the threshold: still GPT, and the local model still asked
        assert (await answer(chain))[1] == "test:gpt"
    assert len(local.calls) == 3
    assert chain.status()[0].state is BackendState.READY
    local.raise_error = None
    assert (await answer(chain))[1] == "test:local"


async def test_when_no_backend_answers_the_causes_are_typed_in_chain_order() -> None:
    clock = Clock()
    local, gpt = ScriptedLLM(label="local"), ScriptedLLM(label="gpt")
    chain = LLMChain(local, gpt, clock=clock)
    await chain.start()
    local.raise_error = BackendFailed("CUDA error")
    gpt.raise_error = RequestRejected("HTTP 400", too_long=True)
    with pytest.raises(NoBackendAvailable) as caught:
        await answer(chain)
    first, second = caught.value.causes
    assert isinstance(first, BackendFailed) and isinstance(second, RequestRejected)
    with pytest.raises(NoBackendAvailable):
        await answer(chain)  # the local model's second failure opens its circuit
    with pytest.raises(NoBackendAvailable) as caught:
        await answer(chain)
    assert isinstance(caught.value.causes[0], CircuitOpen)
    assert chain.status()[1].state is BackendState.READY  # GPT's refusals count for nothing

    with pytest.raises(NoBackendAvailable) as caught:
        await answer(LLMChain(None, None))
    assert caught.value.causes == ()  # nothing configured
