"""OpenAI chat completions (and OpenAI-compatible servers such as vLLM) as an `LLM` backend.

Streams `POST /chat/completions` through the official `openai` SDK and translates its errors into
the port's three kinds:

- `BackendUnavailable`: the backend is unusable as configured and retrying will not help: 401/403
  (bad or unauthorised key), 404 (unknown model or wrong base URL), 429 `insufficient_quota`.
- `BackendTimeout`: no text within `timeout_s` of the call (retries included), or the connection
  stalled for longer than the read timeout.
- `BackendFailed`: this request failed but the next may work: 400/422 (e.g. the prompt is too long),
  429 and 5xx once the SDK's retries are spent, connection errors, malformed or truncated streams.

Messages carry the status code and the server's request id for the logs, never the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterator, Sequence

import openai
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from bot.llm.base import (
    BackendFailed,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    LLMError,
    StreamEvent,
)
from bot.sampling import SamplingSettings

log = logging.getLogger(__name__)

# vLLM and most OpenAI-compatible servers accept any bearer token when they are run without one,
# but the SDK insists on some key.
_PLACEHOLDER_KEY = "EMPTY"
# Connecting is quick or it is not happening; a dead host should fail over fast.
_CONNECT_TIMEOUT_S = 5.0
# Chat-template tokens around each message (OpenAI documents 3 for its models; one spare) and the
# tokens that prime the reply (e.g. "<|im_start|>assistant<|im_sep|>").
_TOKENS_PER_MESSAGE = 4
_TOKENS_REPLY_PRIMING = 3
_MAX_SERVER_MESSAGE = 300


class OpenAIChatLLM:
    """An OpenAI-compatible chat model reached over HTTP.

    `send_top_k=True` is for OpenAI-compatible servers that honour `top_k` (vLLM serving EXAONE as
    the primary backend through LLM_BASE_URL); real OpenAI has no top_k, so it is then listed in
    `unsupported` and never sent. Without an api_key a placeholder is sent, which such servers
    ignore; real OpenAI needs one. `base_url=None` means the SDK's default (OpenAI, or
    OPENAI_BASE_URL when that is set in the environment).
    """

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None,
        base_url: str | None = None,
        context_window: int = 128_000,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        send_top_k: bool = False,
        label: str = "openai",
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self._model = model
        self._api_key = api_key or None
        self._base_url = base_url or None
        self._context_window = context_window
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._send_top_k = send_top_k
        self._name = f"{label}:{model}"
        self._client: openai.AsyncOpenAI | None = None

    def __repr__(self) -> str:  # no key, even by accident
        return f"OpenAIChatLLM(name={self._name!r}, base_url={self._base_url!r})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def unsupported(self) -> frozenset[str]:
        return frozenset() if self._send_top_k else frozenset({"top_k"})

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """An upper bound on the prompt tokens, without a tokenizer.

        OpenAI's tokenizers (cl100k, o200k) and EXAONE's are byte-level BPE: every token stands
        for at least one UTF-8 byte of the text, so a text never takes more tokens than it has
        bytes (one-byte tokens are the worst case). Role and content are counted that way, plus
        the chat template's special tokens per message and the reply priming. This overestimates
        (English averages ~4 bytes a token, Korean ~2-3), which only means history is trimmed
        a little early; underestimating would make the server reject the prompt.
        """
        total = _TOKENS_REPLY_PRIMING
        for message in messages:
            total += _TOKENS_PER_MESSAGE
            total += len(message["role"].encode("utf-8"))
            total += len(message["content"].encode("utf-8"))
        return total

    async def start(self) -> None:
        """Build the client. No network call: `supportbot doctor` checks the key separately."""
        if self._client is not None:
            return
        if self._api_key is None and self._base_url is None:
            raise BackendUnavailable(f"{self._name}: no API key configured")
        self._client = openai.AsyncOpenAI(
            api_key=self._api_key or _PLACEHOLDER_KEY,
            base_url=self._base_url,
            # read bounds the wait for the response headers and any silence inside the stream;
            # the first-token deadline in stream() bounds the whole wait including retries.
            timeout=openai.Timeout(
                self._timeout_s, connect=min(_CONNECT_TIMEOUT_S, self._timeout_s)
            ),
            # The SDK retries 408/409/429/5xx, connection errors and timeouts with backoff,
            # honouring Retry-After; only the request is retried, never a stream already started.
            max_retries=self._max_retries,
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def stream(
        self, messages: Sequence[ChatMessage], sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        client = self._client
        if client is None:
            raise BackendUnavailable(f"{self._name}: not started")
        loop = asyncio.get_running_loop()
        deadline: float | None = loop.time() + self._timeout_s
        started = time.perf_counter()
        first_token_s: float | None = None
        prompt_tokens = completion_tokens = 0
        finish_reason: str | None = None
        chunks: openai.AsyncStream[ChatCompletionChunk] | None = None
        try:
            with self._translate_errors():
                async with asyncio.timeout_at(deadline):
                    chunks = await self._create(client, messages, sampling)
            while True:
                with self._translate_errors():
                    # Until the first text, the deadline also covers a server that accepts the
                    # request and then sends only keep-alives or empty chunks.
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks, None)
                if chunk is None:
                    break
                if chunk.usage is not None:
                    prompt_tokens = chunk.usage.prompt_tokens or 0
                    completion_tokens = chunk.usage.completion_tokens or 0
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if choice.finish_reason is not None:
                        finish_reason = choice.finish_reason
                    # A refusal is the model's answer too; without it the user would get nothing.
                    text = choice.delta.content or choice.delta.refusal
                    if text:
                        if first_token_s is None:
                            first_token_s = time.perf_counter() - started
                            deadline = None  # from here the read timeout guards stalls
                        yield Delta(text)
        finally:
            # Also runs when the consumer stops early (aclose): this closes the HTTP response,
            # so the server stops generating for nobody.
            if chunks is not None:
                await chunks.close()

        if finish_reason is None:
            # A clean end of the body without a finish_reason: a proxy or server cut the answer.
            raise BackendFailed(f"{self._name}: stream ended before the answer was finished")
        if first_token_s is None:
            log.warning("%s answered with no text (finish_reason=%s)", self._name, finish_reason)
        yield Finished(
            backend=self._name,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            first_token_s=first_token_s,
            total_s=time.perf_counter() - started,
        )

    async def _create(
        self,
        client: openai.AsyncOpenAI,
        messages: Sequence[ChatMessage],
        sampling: SamplingSettings,
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        if sampling.do_sample:
            temperature = sampling.temperature
            top_p: float | openai.Omit = sampling.top_p
            extra_body = {"top_k": sampling.top_k} if self._send_top_k else None
        else:
            # Greedy decoding as far as the API allows: temperature 0 picks the likeliest token,
            # but OpenAI does not promise identical outputs for identical requests (batching and
            # hardware nondeterminism), so do_sample=false is only near-deterministic there.
            # vLLM treats temperature 0 as greedy and ignores top_p/top_k, so neither is sent.
            temperature, top_p, extra_body = 0.0, openai.omit, None
        return await client.chat.completions.create(
            model=self._model,
            messages=[_message_param(m) for m in messages],
            temperature=temperature,
            top_p=top_p,
            max_completion_tokens=sampling.max_new_tokens,
            stream=True,
            stream_options={"include_usage": True},  # the last chunk then carries the usage
            extra_body=extra_body,
        )

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Turn SDK and timeout errors into the port's errors, with no API key in the text."""
        try:
            yield
        except LLMError:
            raise
        except TimeoutError:
            raise BackendTimeout(f"{self._name}: no answer within {self._timeout_s:g}s") from None
        except openai.APITimeoutError as err:
            raise BackendTimeout(
                f"{self._name}: timed out waiting for the server ({self._timeout_s:g}s)"
            ) from err
        except openai.APIStatusError as err:
            # `from None`: the SDK's own exception text quotes the server, which may echo the key.
            raise self._status_error(err) from None
        except openai.APIConnectionError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ else "unknown"
            raise BackendFailed(f"{self._name}: connection failed ({cause})") from err
        except openai.APIError as err:  # an error event inside the stream, or a bad payload
            raise BackendFailed(
                f"{self._name}: error in stream: {self._server_text(err)}"
            ) from None
        except ValueError as err:  # the SSE data line was not JSON
            raise BackendFailed(f"{self._name}: malformed stream ({type(err).__name__})") from err
        except openai.OpenAIError as err:
            raise BackendFailed(f"{self._name}: {type(err).__name__}") from None

    def _status_error(self, err: openai.APIStatusError) -> LLMError:
        detail = f"HTTP {err.status_code}"
        if err.code:
            detail += f" {err.code}"
        detail += f" (request id {err.request_id or 'none'}): {self._server_text(err)}"
        message = f"{self._name}: {detail}"
        if isinstance(
            err,
            openai.AuthenticationError | openai.PermissionDeniedError | openai.NotFoundError,
        ):
            return BackendUnavailable(message)
        if isinstance(err, openai.RateLimitError) and err.code == "insufficient_quota":
            return BackendUnavailable(message)
        return BackendFailed(message)

    def _server_text(self, err: openai.APIError) -> str:
        """The server's own message, shortened, with our key blanked out.

        Servers may echo the key (OpenAI echoes a masked one on 401; proxies may not mask it).
        """
        body = err.body
        text = body.get("message") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text:
            text = err.message
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return text[:_MAX_SERVER_MESSAGE]


def _message_param(message: ChatMessage) -> ChatCompletionMessageParam:
    role, content = message["role"], message["content"]
    if role == "system":
        return {"role": "system", "content": content}
    if role == "user":
        return {"role": "user", "content": content}
    if role == "assistant":
        return {"role": "assistant", "content": content}
    raise BackendFailed(f"unsupported message role {role!r}")
