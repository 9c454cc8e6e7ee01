"""Backend faults, through SupportService over real Redis, with real backends only: the local model
(both engines, SimpleEngine and the continuous-batching BatchingEngine, on the tiny EXAONE
checkpoint) raising a CUDA out-of-memory, hanging and failing to load; GPT (OpenAIChatLLM, the
real `openai` client against the fake server) answering 429, 500, malformed or cut streams and
timeouts; both down; and recovery through the circuit breaker, whose clock the tests move past
the cooldown.

Faults in the model are forward hooks on its first decoder layer, so they happen where a real one
would: inside a forward pass, on the thread that runs the model.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from bot.conversation import ConversationKey, Message
from bot.llm.base import LLM, Delta, Finished
from bot.llm.chain import Backend, BackendState, LLMChain
from bot.llm.engine import BatchingEngine
from bot.llm.loader import ModelLoader
from bot.llm.openai_chat import OpenAIChatLLM
from bot.llm.simple_engine import SimpleEngine
from bot.sampling import SamplingSettings
from bot.service import AnswerEvent, Failure, SupportService, User
from bot.store import RedisStore
from tests.fixtures.fake_openai import FakeOpenAI
from tests.support import secrets

pytestmark = pytest.mark.slow

KEY = ConversationKey("slack", "T1", "C-faults")
USER = User("U1", can_configure=True)
# Greedy and short: the tiny model's words do not matter, only who answered.
DEFAULTS = SamplingSettings(do_sample=False, max_new_tokens=6)
ENGINES = ["simple", "batching"]
MAX_RETRIES = 2
GPT = "openai:gpt-4o-mini"


class Clock:
    """The circuit breakers' clock: the test moves it past the cooldown instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Local = SimpleEngine | BatchingEngine


def local_llm(model_dir: Path, engine: str) -> Local:
    loader = ModelLoader(str(model_dir), device="cpu")
    if engine == "simple":
        return SimpleEngine(loader)
    return BatchingEngine(loader, max_in_flight=8)


@pytest.fixture
def gpt(fake_openai: FakeOpenAI) -> Callable[..., OpenAIChatLLM]:
    def make(*, timeout_s: float = 5.0) -> OpenAIChatLLM:
        return OpenAIChatLLM(
            model="gpt-4o-mini",
            api_key=secrets.OPENAI_API_KEY,
            base_url=fake_openai.base_url,
            timeout_s=timeout_s,
            max_retries=MAX_RETRIES,
        )

    return make


@pytest.fixture
async def service(redis: Redis) -> AsyncIterator[Callable[..., Any]]:
    """`await service(primary, fallback, stall_timeout_s=…, clock=…)`: started; closed after.
    `stall_timeout_s` is the primary's; GPT has its own (`fallback_stall_s`)."""
    made: list[SupportService] = []

    async def make(
        primary: LLM | None,
        fallback: LLM | None,
        *,
        stall_timeout_s: float = 10.0,
        fallback_stall_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> SupportService:
        chain = LLMChain(
            Backend(primary, stall_timeout_s) if primary else None,
            Backend(fallback, fallback_stall_s) if fallback else None,
            clock=clock,
        )
        store = RedisStore(
            redis, defaults=DEFAULTS, max_new_tokens_limit=64, max_messages=40, ttl_seconds=3600
        )
        svc = SupportService(
            store=store,
            llm=chain,
            persona="You are a support bot.",
        )
        made.append(svc)
        await svc.llm.start()
        return svc

    yield make
    for svc in made:
        await svc.llm.aclose()


async def ask(svc: SupportService, text: str) -> tuple[list[AnswerEvent], str]:
    events = [event async for event in svc.ask(KEY, USER, text)]
    return events, "".join(e.text for e in events if isinstance(e, Delta))


def backend_of(events: list[AnswerEvent]) -> str:
    last = events[-1]
    assert isinstance(last, Finished), last
    return last.backend


def logged_failure(caplog: pytest.LogCaptureFixture, events: list[AnswerEvent]) -> str:
    """The failure the user got ends the events, has an id, and that id is on one ERROR line."""
    failure = events[-1]
    assert isinstance(failure, Failure), failure
    assert failure.error_id, failure
    assert f"(error id: {failure.error_id})" in failure.message
    assert "Traceback" not in failure.message
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and f"[error_id={failure.error_id}]" in r.getMessage()
    ]
    assert len(lines) == 1, caplog.text
    return lines[0]


def first_layer(llm: Local) -> torch.nn.Module:
    model: Any = llm.loaded.model
    return model.model.layers[0]  # type: ignore[no-any-return]


@pytest.fixture
def forwards() -> Iterator[Callable[[Local], list[int]]]:
    """`count(llm)`: a list whose length is the number of forward passes the model has run."""
    handles: list[Any] = []

    def count(llm: Local) -> list[int]:
        calls: list[int] = []
        handles.append(first_layer(llm).register_forward_pre_hook(lambda *_: calls.append(1)))
        return calls

    yield count
    for handle in handles:
        handle.remove()


def out_of_memory(*_: Any) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


class RootRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def engine_threads() -> list[threading.Thread]:
    """The local model's worker (SimpleEngine) and generation loop (transformers' engine)
    threads."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("local-llm") or "_run_generation_loop" in t.name
    ]


# -- the local model raising, hanging, failing to load → GPT answers --------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_cuda_out_of_memory_in_the_local_model_is_answered_by_gpt(
    engine, tiny_exaone_dir, gpt, service, fake_openai, caplog
):
    local = local_llm(tiny_exaone_dir, engine)
    svc = await service(local, gpt())
    hook = first_layer(local).register_forward_hook(out_of_memory)
    # What reaches the root logger's handlers, where the bot's own (redacting) handler sits.
    # (caplog would not do: pytest also hooks loggers that do not propagate to the root.)
    at_root = RootRecords()
    logging.getLogger().addHandler(at_root)
    try:
        with caplog.at_level(logging.INFO):
            events, text = await ask(svc, "Why did the deploy fail?")
    finally:
        hook.remove()
        logging.getLogger().removeHandler(at_root)

    assert backend_of(events) == GPT and text == "echo: Why did the deploy fail?"
    assert len(fake_openai.chat_requests) == 1
    assert await svc.store.history(KEY) == [
        Message("user", "Why did the deploy fail?"),
        Message("assistant", "echo: Why did the deploy fail?"),
    ]
    # The operator sees why GPT answered, on a line the bot's logging (and redaction) handles.
    warning = [m for m in at_root.messages if "primary backend" in m]
    assert len(warning) == 1 and "CUDA out of memory" in warning[0]
    if engine == "batching":
        # transformers logs the engine's crash on a stderr handler of its own, past the bot's
        # redaction and LOG_FORMAT, unless the engine routes it to the root like the rest.
        assert any("Error in generation loop" in m for m in at_root.messages)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_hung_local_model_times_out_to_gpt_and_its_thread_ends(
    engine, tiny_exaone_dir, gpt, service, forwards
):
    local = local_llm(tiny_exaone_dir, engine)
    # The local model's stall timeout: short, but not so short that a busy CI machine trips it.
    svc = await service(local, gpt(), stall_timeout_s=1.0)
    passes = forwards(local)
    gate = threading.Event()
    hook = first_layer(local).register_forward_hook(lambda *_: gate.wait(20))
    try:
        for question in ("first", "second", "third"):
            began = time.monotonic()
            events, text = await ask(svc, question)
            assert backend_of(events) == GPT and text == f"echo: {question}"
            assert time.monotonic() - began < 5.0  # the stall timeout, not the 20 s hang
        # Two timeouts opened the circuit: the third question did not wait for the local model.
        assert "circuit open" in await svc.settings(KEY, USER, "show")
        assert len(passes) == 1  # the model is still inside its first forward pass
        assert any(t.is_alive() for t in engine_threads())
    finally:
        gate.set()  # the device comes back to life
        hook.remove()

    # The abandoned generation stops at its next token, so closing does not wait for it, and
    # no thread is left behind to keep the process alive.
    began = time.monotonic()
    await local.aclose()
    assert time.monotonic() - began < 10
    assert engine_threads() == []
    assert len(passes) <= 3


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_local_model_that_fails_to_load_leaves_gpt_answering(
    engine, tiny_exaone_dir, tmp_path, gpt, service, fake_openai, caplog
):
    broken = tmp_path / "EXAONE-3.5-broken"
    shutil.copytree(tiny_exaone_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short

    with caplog.at_level(logging.INFO):
        svc = await service(local_llm(broken, engine), gpt())
        events, text = await ask(svc, "hello")

    assert backend_of(events) == GPT and text == "echo: hello"
    primary, fallback = svc.llm.status()
    assert primary.state is BackendState.UNAVAILABLE and "EXAONE-3.5-broken" in primary.detail
    assert fallback.state is BackendState.READY
    assert "Answering: openai:gpt-4o-mini" in await svc.settings(KEY, USER, "show")
    assert any("EXAONE-3.5-broken" in r.getMessage() for r in caplog.records)
    await svc.llm.aclose()
    assert engine_threads() == []  # the failed load left no thread behind


# -- GPT faults: retried with backoff, then a clear message with an id ------------------------


GPT_FAULTS: dict[str, tuple[Callable[[FakeOpenAI, int], None], str]] = {
    # name: (script `times` faults, what the log line says)
    "429": (lambda fake, n: fake.fail(429, times=n, retry_after=0.2), "HTTP 429"),
    "500": (lambda fake, n: fake.fail(500, times=n), "HTTP 500"),
    "malformed": (lambda fake, n: fake.malformed(after_chunks=0, times=n), "malformed stream"),
    "cut": (lambda fake, n: fake.die(after_chunks=0, times=n), "connection failed"),
    "timeout": (lambda fake, n: fake.stall(times=n), "no answer within 1.5s"),
    "timeout-after-headers": (
        lambda fake, n: fake.stall(after_chunks=0, times=n),
        "no answer within 1.5s",
    ),
}

# What the user is told for each fault: (metrics reason, words of the message).
FAULT_REASONS = {
    "429": ("rate_limited", "rate-limited"),
    "500": ("failed", "the model failed while answering"),
    "malformed": ("failed", "the model failed while answering"),
    "cut": ("failed", "the model failed while answering"),
    "timeout": ("timeout", "took too long"),
    "timeout-after-headers": ("timeout", "took too long"),
}


def gpt_timeout(fault: str) -> float:
    # Short where the fault is silence, so the test is quick; long enough elsewhere that the
    # backoff is not cut short to fit the attempts into the deadline.
    return 1.5 if fault.startswith("timeout") else 5.0


def gaps(fake: FakeOpenAI) -> list[float]:
    times = [r.received_at for r in fake.chat_requests]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.mark.parametrize("fault", list(GPT_FAULTS))
async def test_gpt_faults_are_retried_then_a_clear_message_with_an_id(
    fault, gpt, service, fake_openai, caplog
):
    script, cause = GPT_FAULTS[fault]
    svc = await service(None, gpt(timeout_s=gpt_timeout(fault)))
    script(fake_openai, MAX_RETRIES + 1)  # every attempt fails

    with caplog.at_level(logging.INFO):
        events, text = await ask(svc, "Is the API down?")

    assert text == ""
    assert len(fake_openai.chat_requests) == MAX_RETRIES + 1
    line = logged_failure(caplog, events)
    failure = events[-1]
    assert isinstance(failure, Failure) and failure.reason == FAULT_REASONS[fault][0]
    assert FAULT_REASONS[fault][1] in failure.message  # what happened, by reason
    assert "OPENAI_API_KEY" not in failure.message and "not set" not in failure.message
    assert cause in line
    if fault in ("429", "500"):
        assert fake_openai.chat_requests[-1].request_id in line  # OpenAI's id, for support
    first, second = gaps(fake_openai)
    if fault == "429":
        assert first >= 0.2 and second >= 0.2  # Retry-After honoured
    if fault == "500":
        assert 0.3 < first < second  # exponential backoff: ~0.5 s, then ~1 s
    assert await svc.store.history(KEY) == [Message("user", "Is the API down?")]  # not lost
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == MAX_RETRIES


@pytest.mark.parametrize("fault", list(GPT_FAULTS))
async def test_gpt_faults_within_the_retries_are_invisible(fault, gpt, service, fake_openai):
    script, _ = GPT_FAULTS[fault]
    svc = await service(None, gpt(timeout_s=gpt_timeout(fault)))
    script(fake_openai, MAX_RETRIES)  # the last attempt succeeds

    events, text = await ask(svc, "Is the API down?")

    assert backend_of(events) == GPT and text == "echo: Is the API down?"
    assert len(fake_openai.chat_requests) == MAX_RETRIES + 1
    history = await svc.store.history(KEY)
    assert history[-1] == Message("assistant", "echo: Is the API down?")


async def test_a_stream_broken_after_text_is_reported_not_retried(
    gpt, service, fake_openai, caplog
):
    svc = await service(None, gpt())
    fake_openai.malformed()  # one chunk of text, then garbage

    with caplog.at_level(logging.INFO):
        events, text = await ask(svc, "Tell me everything")

    assert text == "echo: "  # what the user already saw
    line = logged_failure(caplog, events)
    failure = events[-1]
    assert isinstance(failure, Failure) and "cut off" in failure.message
    assert "malformed stream" in line
    assert len(fake_openai.chat_requests) == 1  # a retry would splice two answers
    assert await svc.store.history(KEY) == [Message("user", "Tell me everything")]


# -- both down, then both back ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_both_down_is_a_clear_message_and_recovery_closes_the_circuit(
    engine, tiny_exaone_dir, gpt, service, fake_openai, forwards, caplog
):
    clock = Clock()
    local = local_llm(tiny_exaone_dir, engine)
    svc = await service(local, gpt(), clock=clock)
    passes = forwards(local)
    oom = first_layer(local).register_forward_hook(out_of_memory)
    try:
        # Both down: the local model runs out of memory and GPT answers 500 to every attempt.
        fake_openai.fail(500, times=2 * (MAX_RETRIES + 1), retry_after=0.01)
        with caplog.at_level(logging.INFO):
            for question in ("q1", "q2"):
                events, _ = await ask(svc, question)
                line = logged_failure(caplog, events)
                failure = events[-1]
                assert isinstance(failure, Failure) and failure.reason == "failed"
                assert "the model failed while answering" in failure.message
                assert "out of memory" in line and "HTTP 500" in line  # both reasons
                assert "supportbot doctor" in failure.message
        assert len(fake_openai.chat_requests) == 2 * (MAX_RETRIES + 1)
        assert await svc.store.history(KEY) == [Message("user", "q1"), Message("user", "q2")]

        # Two failures each: both circuits are open, and requests skip the broken backends.
        show = await svc.settings(KEY, USER, "show")
        assert show.count("circuit open") == 2
        tried = len(passes)
        events, _ = await ask(svc, "q3")
        assert isinstance(events[-1], Failure)
        assert len(passes) == tried and len(fake_openai.chat_requests) == 2 * (MAX_RETRIES + 1)

        # GPT comes back; the local model too, but its circuit is still open: GPT answers, and
        # the local model is not even tried until the cooldown is over.
        oom.remove()
        clock.now += 31  # both cooldowns over: one trial call each
        events, _ = await ask(svc, "q4")
    finally:
        oom.remove()
    # The local model's trial call succeeds and closes its circuit: it answers again.
    assert backend_of(events).startswith("local:")
    assert len(passes) > tried
    for question in ("q5", "q6"):
        events, _ = await ask(svc, question)
        assert backend_of(events).startswith("local:")
    assert svc.llm.status()[0].state is BackendState.READY
    assert len(fake_openai.chat_requests) == 2 * (MAX_RETRIES + 1)  # GPT was not needed


@pytest.mark.parametrize("engine", ENGINES)
async def test_circuit_breaker_skips_a_failing_local_model_and_closes_after_a_good_trial(
    engine, tiny_exaone_dir, gpt, service, fake_openai, forwards
):
    clock = Clock()
    local = local_llm(tiny_exaone_dir, engine)
    svc = await service(local, gpt(), clock=clock)
    passes = forwards(local)
    oom = first_layer(local).register_forward_hook(out_of_memory)
    try:
        for question in ("q1", "q2"):  # two failures open the circuit
            events, _ = await ask(svc, question)
            assert backend_of(events) == GPT
        assert svc.llm.status()[0].state is BackendState.CIRCUIT_OPEN
        tried = len(passes)

        events, _ = await ask(svc, "q3")  # open: GPT at once, the local model is skipped
        assert backend_of(events) == GPT and len(passes) == tried
        oom.remove()  # the memory is free again, but nobody knows until a trial
        clock.now += 29
        events, _ = await ask(svc, "q4")  # still inside the cooldown
        assert backend_of(events) == GPT and len(passes) == tried
        clock.now += 2  # cooldown over: the next question is the trial
    finally:
        oom.remove()
    events, _ = await ask(svc, "q5")
    assert backend_of(events).startswith("local:") and len(passes) > tried
    assert svc.llm.status()[0].state is BackendState.READY
    events, _ = await ask(svc, "q6")
    assert backend_of(events).startswith("local:")
    assert len(fake_openai.chat_requests) == 4  # q1…q4
