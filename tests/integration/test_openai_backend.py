"""OpenAIChatLLM with the real `openai` client against the fake OpenAI server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.llm.base import (
    BackendFailed,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    RateLimited,
    RequestRejected,
    StreamEvent,
)
from bot.llm.openai_chat import OpenAIChatLLM
from bot.sampling import SamplingSettings
from tests.fixtures.fake_openai import FakeOpenAI, fake_openai_fixture  # noqa: F401

API_KEY = "sk-test-0123456789abcdefSECRET"
QUESTION = "How do I reset my password?"
MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are a helpful support bot."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello! 무엇을 도와드릴까요?"},
    {"role": "user", "content": QUESTION},
]
SAMPLING = SamplingSettings(temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=64)


@pytest.fixture
async def make_llm(
    fake_openai: FakeOpenAI,
) -> AsyncIterator[Callable[..., Awaitable[OpenAIChatLLM]]]:
    """Builds started backends aimed at the fake and closes them after the test."""
    made: list[OpenAIChatLLM] = []

    async def make(**kwargs: object) -> OpenAIChatLLM:
        options: dict[str, object] = {
            "model": "gpt-4o-mini",
            "api_key": API_KEY,
            "base_url": fake_openai.base_url,
            "timeout_s": 5.0,
        }
        options.update(kwargs)
        llm = OpenAIChatLLM(**options)  # type: ignore[arg-type]
        await llm.start()
        made.append(llm)
        return llm

    yield make
    for llm in made:
        await llm.aclose()


async def collect(
    llm: OpenAIChatLLM,
    messages: list[ChatMessage] = MESSAGES,
    sampling: SamplingSettings = SAMPLING,
) -> tuple[list[Delta], Finished]:
    events: list[StreamEvent] = [e async for e in llm.stream(llm.encode(messages), sampling)]
    deltas = [e for e in events if isinstance(e, Delta)]
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 1 and events[-1] is finished[0], events
    return deltas, finished[0]


async def test_streams_the_answer_in_several_deltas(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.answer("Open Settings, then choose Reset password. 끝!", usage=(42, 9))
    llm = await make_llm()

    deltas, finished = await collect(llm)

    assert len(deltas) > 3
    assert "".join(d.text for d in deltas) == "Open Settings, then choose Reset password. 끝!"
    assert finished.backend == "openai:gpt-4o-mini" == llm.name
    assert (finished.prompt_tokens, finished.completion_tokens) == (42, 9)
    assert finished.first_token_s is not None
    assert 0 < finished.first_token_s <= finished.total_s


async def test_default_fake_answer_echoes_the_question(fake_openai: FakeOpenAI, make_llm) -> None:
    deltas, _ = await collect(await make_llm())
    assert "".join(d.text for d in deltas) == f"echo: {QUESTION}"


async def test_request_body_for_openai(fake_openai: FakeOpenAI, make_llm) -> None:
    llm = await make_llm()
    assert llm.unsupported == frozenset({"top_k"})

    await collect(llm)

    [request] = fake_openai.chat_requests
    body = request.body
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == MESSAGES
    assert body["temperature"] == 0.8
    assert body["top_p"] == 0.9
    assert body["max_completion_tokens"] == 64
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "top_k" not in body
    assert "max_tokens" not in body
    assert request.has_authorization
    assert API_KEY not in repr(request.headers)


async def test_top_k_is_sent_to_compatible_servers(fake_openai: FakeOpenAI, make_llm) -> None:
    llm = await make_llm(api_key=None, send_top_k=True, label="local", model="exaone")
    assert llm.unsupported == frozenset()
    assert llm.name == "local:exaone"

    _, finished = await collect(llm)

    body = fake_openai.chat_requests[0].body
    assert body["top_k"] == 40
    assert body["temperature"] == 0.8
    assert finished.backend == "local:exaone"


async def test_do_sample_false_is_temperature_zero(fake_openai: FakeOpenAI, make_llm) -> None:
    llm = await make_llm(send_top_k=True)
    greedy = SamplingSettings(temperature=1.3, top_k=5, top_p=0.5, do_sample=False)

    await collect(llm, sampling=greedy)

    body = fake_openai.chat_requests[0].body
    assert body["temperature"] == 0
    assert "top_p" not in body
    assert "top_k" not in body


async def test_rate_limit_is_retried(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.fail(429, retry_after=0.01)
    llm = await make_llm(max_retries=2)

    deltas, _ = await collect(llm)

    assert "".join(d.text for d in deltas) == f"echo: {QUESTION}"
    assert len(fake_openai.chat_requests) == 2


async def test_persistent_server_errors_fail_after_the_retries(
    fake_openai: FakeOpenAI, make_llm
) -> None:
    fake_openai.fail(500, times=10, retry_after=0.01)
    llm = await make_llm(max_retries=2)

    with pytest.raises(BackendFailed) as caught:
        await collect(llm)

    assert len(fake_openai.chat_requests) == 3
    last = fake_openai.chat_requests[-1]
    assert "HTTP 500" in str(caught.value)
    assert last.request_id in str(caught.value)


async def test_rate_limit_after_retries_is_a_failure(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.fail(429, times=10, retry_after=0.01)
    llm = await make_llm(max_retries=1)

    with pytest.raises(RateLimited, match="HTTP 429"):
        await collect(llm)
    assert len(fake_openai.chat_requests) == 2


async def test_bad_key_is_unavailable_and_never_shown(fake_openai: FakeOpenAI, make_llm) -> None:
    # The fake echoes the rejected key in its message, as a careless proxy might.
    fake_openai.required_api_key = "sk-the-right-one"
    llm = await make_llm()

    with pytest.raises(BackendUnavailable) as caught:
        await collect(llm)

    text = str(caught.value)
    assert "HTTP 401" in text
    assert fake_openai.chat_requests[0].request_id in text
    assert API_KEY not in text
    assert API_KEY not in repr(caught.value)
    assert caught.value.__cause__ is None or API_KEY not in str(caught.value.__cause__)
    assert API_KEY not in repr(llm)
    assert len(fake_openai.chat_requests) == 1  # 401 is not retried


@pytest.mark.parametrize("status", [403, 404])
async def test_permission_and_not_found_are_unavailable(
    fake_openai: FakeOpenAI, make_llm, status: int
) -> None:
    fake_openai.fail(status)
    with pytest.raises(BackendUnavailable, match=f"HTTP {status}"):
        await collect(await make_llm())


async def test_a_prompt_too_long_is_a_rejected_request(fake_openai: FakeOpenAI, make_llm) -> None:
    # vLLM's wording, without OpenAI's code: both are recognised as "too long".
    fake_openai.fail(400, message="This model's maximum context length is 128000 tokens.")
    with pytest.raises(RequestRejected, match="maximum context length") as caught:
        await collect(await make_llm())
    assert caught.value.too_long


async def test_other_bad_requests_are_rejected_but_not_too_long(
    fake_openai: FakeOpenAI, make_llm
) -> None:
    fake_openai.fail(400, message="Invalid value for 'top_p'.")
    with pytest.raises(RequestRejected) as caught:
        await collect(await make_llm())
    assert not caught.value.too_long
    assert len(fake_openai.chat_requests) == 1  # the same request would fail again


async def test_stall_before_headers_times_out(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.stall(times=5)
    llm = await make_llm(timeout_s=0.5, max_retries=2)

    began = time.monotonic()
    with pytest.raises(BackendTimeout):
        await collect(llm)
    elapsed = time.monotonic() - began

    # The first-token deadline covers the SDK's retries, so this is ~timeout_s, not 3x.
    assert 0.4 < elapsed < 1.5


async def test_stall_mid_stream_times_out(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.stall(after_chunks=2)
    llm = await make_llm(timeout_s=0.5)

    received: list[str] = []
    began = time.monotonic()
    with pytest.raises(BackendTimeout):
        async for event in llm.stream(llm.encode(MESSAGES), SAMPLING):
            if isinstance(event, Delta):
                received.append(event.text)
    elapsed = time.monotonic() - began

    assert "".join(received) == "echo: How "
    assert elapsed < 2.0
    assert fake_openai.wait_for(lambda: fake_openai.chat_requests[0].disconnected)


async def test_malformed_stream_fails(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.malformed()
    with pytest.raises(BackendFailed, match="malformed"):
        await collect(await make_llm())


async def test_stream_cut_midway_fails(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.die(after_chunks=2)
    with pytest.raises(BackendFailed, match="connection"):
        await collect(await make_llm())


async def test_stream_without_finish_reason_fails(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.answer("half an ans", finish_reason=None)
    with pytest.raises(BackendFailed, match="before the answer was finished"):
        await collect(await make_llm())


async def test_stopping_early_closes_the_http_stream(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.stall(after_chunks=2)  # the server would wait forever for the consumer
    llm = await make_llm()

    events = llm.stream(llm.encode(MESSAGES), SAMPLING)
    first = await anext(events)
    assert isinstance(first, Delta)
    await events.aclose()

    assert fake_openai.wait_for(lambda: fake_openai.chat_requests[0].disconnected, 3.0)


async def test_concurrent_streams(fake_openai: FakeOpenAI, make_llm) -> None:
    llm = await make_llm()

    async def ask(question: str) -> str:
        deltas, _ = await collect(llm, [{"role": "user", "content": question}])
        return "".join(d.text for d in deltas)

    answers = await asyncio.gather(*(ask(f"question {i}") for i in range(8)))
    assert answers == [f"echo: question {i}" for i in range(8)]


async def test_start_without_key_or_base_url_is_unavailable() -> None:
    llm = OpenAIChatLLM(model="gpt-4o-mini", api_key=None)
    with pytest.raises(BackendUnavailable, match="no API key"):
        await llm.start()


async def test_base_url_without_key_sends_a_placeholder(fake_openai: FakeOpenAI, make_llm) -> None:
    fake_openai.required_api_key = "EMPTY"
    deltas, _ = await collect(await make_llm(api_key=None))
    assert deltas


async def test_unreachable_server_fails(make_llm) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = await make_llm(base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout_s=2.0)
    with pytest.raises(BackendFailed, match="connection failed"):
        await collect(llm)


# --- the fake itself, for other users (e.g. the doctor's key check) ----------------------------


def test_fake_serves_models_and_plain_completions_to_the_sync_client(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.models = ["gpt-4o-mini", "gpt-4o"]
    fake_openai.answer("plain answer", usage=(7, 2))
    with openai.OpenAI(api_key=API_KEY, base_url=fake_openai.base_url, max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "gpt-4o"]
        completion = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": QUESTION}]
        )
        assert completion.choices[0].message.content == "plain answer"
        assert completion.usage is not None and completion.usage.prompt_tokens == 7

        fake_openai.required_api_key = "sk-other"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    paths = [r.path for r in fake_openai.requests]
    assert paths == ["/v1/models", "/v1/chat/completions", "/v1/models"]


# --- encode and count_each ----------------------------------------------------------------------


@functools.cache
def _byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer


def _worst_case_tokens(messages: list[ChatMessage]) -> int:
    """Tokens under a byte-level BPE with no merges, the most tokens such a tokenizer can need.

    Built with `tokenizers` (a vocabulary of the 256 byte symbols only) so the bound is checked
    against a real tokenizer rather than against the formula it comes from.
    """
    tokenizer = _byte_tokenizer()
    # Per message: role, content, and three template tokens (start, separator, end), + reply 3.
    return (
        sum(
            len(tokenizer.encode(m["role"]).ids) + len(tokenizer.encode(m["content"]).ids) + 3
            for m in messages
        )
        + 3
    )


def count_tokens(llm: OpenAIChatLLM, messages: list[ChatMessage]) -> int:
    prompt = llm.encode(messages)
    assert prompt.messages == messages and prompt.ids is None  # the server encodes them
    return prompt.tokens


def test_encode_is_an_upper_bound_with_korean() -> None:
    llm = OpenAIChatLLM(model="gpt-4o-mini", api_key=API_KEY)
    korean: list[ChatMessage] = [
        {"role": "system", "content": "당신은 친절한 고객 지원 봇입니다."},
        {"role": "user", "content": "비밀번호를 어떻게 재설정하나요? 🙏"},
    ]
    assert count_tokens(llm, korean) >= _worst_case_tokens(korean)
    assert count_tokens(llm, MESSAGES) >= _worst_case_tokens(MESSAGES)
    # Korean syllables are 3 UTF-8 bytes each: the estimate counts bytes, not characters.
    assert count_tokens(llm, korean) > sum(len(m["content"]) for m in korean) * 2
    assert count_tokens(llm, []) == 3
    assert sum(llm.count_each(korean)) == count_tokens(llm, korean)
    assert llm.count_each([]) == []


def test_count_each_bounds_every_message_alone() -> None:
    llm = OpenAIChatLLM(model="gpt-4o-mini", api_key=API_KEY)
    counts = llm.count_each(MESSAGES)
    assert len(counts) == len(MESSAGES)
    for message, count in zip(MESSAGES[1:], counts[1:], strict=True):
        # Alone, a message has no reply priming (the first message carries it).
        assert count >= _worst_case_tokens([message]) - 3


@settings(max_examples=50, deadline=None)
@given(
    contents=st.lists(st.text(max_size=40), max_size=5),
    extra=st.text(min_size=1, max_size=20),
)
def test_encode_is_monotonic(contents: list[str], extra: str) -> None:
    llm = OpenAIChatLLM(model="m", api_key="k")
    messages: list[ChatMessage] = [{"role": "user", "content": c} for c in contents]
    base = count_tokens(llm, messages)
    assert base >= _worst_case_tokens(messages)
    longer: list[ChatMessage] = [*messages, {"role": "assistant", "content": extra}]
    assert count_tokens(llm, longer) > base
    if messages:
        last: ChatMessage = {"role": "user", "content": messages[-1]["content"] + extra}
        grown: list[ChatMessage] = [*messages[:-1], last]
        assert count_tokens(llm, grown) > base
