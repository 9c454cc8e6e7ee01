"""An OpenAI-compatible server that refuses a request field, and one that publishes its context
window: OpenAIChatLLM learns both, with the real `openai` client against the fake server."""

from __future__ import annotations

# ruff: noqa: F811 - make_llm is a fixture imported from test_openai_backend
import logging

import pytest

from bot.llm.base import RequestRejected
from bot.llm.openai_chat import OpenAIChatLLM
from bot.sampling import SamplingSettings
from tests.fixtures.fake_openai import FakeOpenAI
from tests.integration.test_openai_backend import API_KEY, SAMPLING, collect, make_llm  # noqa: F401

# transformers serve's words, as FastAPI sends them.
TOP_K_REFUSED = "Unexpected fields in the request: {'top_k'}"


async def test_a_refused_top_k_is_retried_once_without_it_and_remembered(
    fake_openai: FakeOpenAI, make_llm, caplog: pytest.LogCaptureFixture
) -> None:
    llm = await make_llm(send_top_k=True, label="server")
    assert "top_k" not in llm.unsupported
    fake_openai.fail(422, message=TOP_K_REFUSED)
    with caplog.at_level(logging.WARNING, logger="bot.llm.openai_chat"):
        deltas, _ = await collect(llm)
    assert "".join(d.text for d in deltas)  # answered
    first, second = (r.body for r in fake_openai.chat_requests)
    assert first["top_k"] == 40
    assert "top_k" not in second
    assert second["temperature"] == 0.8 and second["top_p"] == 0.9  # nothing else dropped
    # Remembered: the next question does not send it, and `show` is told.
    await collect(llm)
    assert len(fake_openai.chat_requests) == 3
    assert "top_k" not in fake_openai.chat_requests[2].body
    assert "top_k" in llm.unsupported
    # Logged once, with the server's own words and no key.
    refusals = [r for r in caplog.records if "does not accept 'top_k'" in r.getMessage()]
    assert len(refusals) == 1
    assert "HTTP 422" in refusals[0].getMessage()
    assert TOP_K_REFUSED in refusals[0].getMessage()
    assert API_KEY not in caplog.text


async def test_a_refused_max_completion_tokens_becomes_max_tokens(
    fake_openai: FakeOpenAI, make_llm
) -> None:
    llm = await make_llm()
    fake_openai.fail(400, message="Unrecognized request argument: max_completion_tokens")
    await collect(llm)
    retried = fake_openai.chat_requests[1].body
    assert retried["max_tokens"] == 64 and "max_completion_tokens" not in retried
    assert llm.unsupported == frozenset({"top_k"})  # no sampling key lost


async def test_a_bad_value_is_not_a_refused_field(fake_openai: FakeOpenAI, make_llm) -> None:
    llm = await make_llm(send_top_k=True)
    fake_openai.fail(400, message="top_k must be at least 1, got 0")
    with pytest.raises(RequestRejected, match="top_k must be at least 1"):
        await collect(llm)
    assert len(fake_openai.chat_requests) == 1
    assert "top_k" not in llm.unsupported


async def test_a_field_refused_again_after_the_retry_is_a_rejection(
    fake_openai: FakeOpenAI, make_llm
) -> None:
    llm = await make_llm(send_top_k=True)
    fake_openai.fail(422, message=TOP_K_REFUSED, times=2)  # a server that says it of anything
    with pytest.raises(RequestRejected, match="Unexpected fields"):
        await collect(llm)
    assert len(fake_openai.chat_requests) == 2  # one retry without top_k, no loop


async def test_greedy_requests_never_learn_top_k(fake_openai: FakeOpenAI, make_llm) -> None:
    llm = await make_llm(send_top_k=True)
    fake_openai.fail(422, message=TOP_K_REFUSED)
    with pytest.raises(RequestRejected):  # top_k was not sent, so it is not the cause
        await collect(llm, sampling=SamplingSettings(do_sample=False, max_new_tokens=8))
    assert "top_k" not in llm.unsupported


async def test_context_window_is_read_from_the_server(fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ["served-model"]
    fake_openai.model_fields = {"max_model_len": 4096}
    found = OpenAIChatLLM(
        model="served-model", api_key=None, base_url=fake_openai.base_url, discover_context=True
    )
    kept = OpenAIChatLLM(
        model="served-model", api_key=None, base_url=fake_openai.base_url, context_window=999
    )
    try:
        await found.start()
        await kept.start()
        assert found.context_window == 4096
        assert kept.context_window == 999  # set by the operator: not asked
    finally:
        await found.aclose()
        await kept.aclose()


async def test_a_server_without_a_context_window_keeps_the_default(
    fake_openai: FakeOpenAI,
) -> None:
    llm = OpenAIChatLLM(
        model="gpt-4o-mini",
        api_key=None,
        base_url=fake_openai.base_url,
        context_window=32_768,
        discover_context=True,
    )
    try:
        await llm.start()
        assert llm.context_window == 32_768
    finally:
        await llm.aclose()
