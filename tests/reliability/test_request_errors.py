"""A request the backend refuses (HTTP 400 context_length_exceeded, 429) is that request's
problem: through SupportService over real Redis and the real `openai` client against the fake
server, one channel's refusals never open GPT's circuit for the other channels, and each user
is told what happened and what to do, by reason, with an error id."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bot.conversation import ConversationKey
from bot.llm.base import Delta, Finished
from bot.llm.chain import Backend, BackendState, LLMChain
from bot.llm.openai_chat import OpenAIChatLLM
from bot.service import AnswerEvent, Failure, SupportService, User
from tests.conftest import make_store
from tests.fixtures.fake_openai import FakeOpenAI
from tests.support import secrets

USER = User("U1")
NOISY = ConversationKey("slack", "T1", "C-noisy")
QUIET = ConversationKey("slack", "T1", "C-quiet")
TOO_LONG = (
    "This model's maximum context length is 8192 tokens. However, your messages resulted in "
    "9000 tokens. Please reduce the length of the messages."
)


@pytest.fixture
async def gpt_only(redis: Redis, fake_openai: FakeOpenAI) -> AsyncIterator[SupportService]:
    """GPT as the only backend (LLM_MODEL=none), as in the report: nothing to fall back to."""
    gpt = OpenAIChatLLM(
        model="gpt-4o-mini",
        api_key=secrets.OPENAI_API_KEY,
        base_url=fake_openai.base_url,
        timeout_s=5.0,
        max_retries=1,
    )
    svc = SupportService(
        store=make_store(redis), llm=LLMChain(None, Backend(gpt, 5.0)), persona="A bot."
    )
    await svc.llm.start()
    yield svc
    await svc.llm.aclose()


async def ask(svc: SupportService, key: ConversationKey, text: str) -> list[AnswerEvent]:
    return [event async for event in svc.ask(key, USER, text)]


def failure_of(events: list[AnswerEvent], caplog: pytest.LogCaptureFixture) -> Failure:
    (failure,) = events
    assert isinstance(failure, Failure) and failure.error_id
    assert f"(error id: {failure.error_id})" in failure.message
    assert f"[error_id={failure.error_id}]" in caplog.text
    assert "OPENAI_API_KEY" not in failure.message and "not set" not in failure.message
    return failure


async def test_two_context_length_refusals_leave_gpt_answering_other_channels(
    gpt_only: SupportService, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(2):
        fake_openai.fail(400, message=TOO_LONG)
        failure = failure_of(await ask(gpt_only, NOISY, "a very long question"), caplog)
        assert failure.reason == "too_long"
        assert "too long for the model" in failure.message
        assert "/llm-settings forget" in failure.message  # what to do
    assert len(fake_openai.chat_requests) == 2  # a refusal is not retried

    assert gpt_only.llm.status()[0].state is BackendState.READY
    events = await ask(gpt_only, QUIET, "is the deploy done?")
    assert isinstance(events[-1], Finished), events[-1]
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "echo: is the deploy done?"
    assert len(fake_openai.chat_requests) == 3


async def test_rate_limited_and_timed_out_say_so_and_keep_the_circuit_closed_on_429(
    gpt_only: SupportService, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(3):
        fake_openai.fail(429, times=2, retry_after=0.01)  # the first try and its one retry
        failure = failure_of(await ask(gpt_only, NOISY, "hello?"), caplog)
        assert failure.reason == "rate_limited" and "rate-limited" in failure.message
        assert "ask again in a minute" in failure.message
    assert gpt_only.llm.status()[0].state is BackendState.READY

    fake_openai.stall(times=2)
    timed_out = OpenAIChatLLM(
        model="gpt-4o-mini",
        api_key=secrets.OPENAI_API_KEY,
        base_url=fake_openai.base_url,
        timeout_s=0.5,
        max_retries=1,
    )
    svc = SupportService(
        store=gpt_only.store, llm=LLMChain(None, Backend(timed_out, 5.0)), persona="A bot."
    )
    await svc.llm.start()
    try:
        failure = failure_of(await ask(svc, QUIET, "anyone there?"), caplog)
    finally:
        await svc.llm.aclose()
    assert failure.reason == "timeout" and "took too long" in failure.message
