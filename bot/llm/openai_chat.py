"""OpenAI chat completions (and OpenAI-compatible servers such as vLLM) as an `LLM` backend.

Streams `POST /chat/completions` through the official `openai` SDK and translates its errors into
the port's kinds:

- `BackendUnavailable`: the backend is unusable as configured and retrying will not help: 401/403
  (bad or unauthorised key), 404 (unknown model or wrong base URL), 429 `insufficient_quota`.
- `BackendTimeout`: no text within `timeout_s` of the call (retries included), or the connection
  stalled for longer than the read timeout.
- `RequestRejected`: other 4xx (400, 413, 422: the prompt too long, a bad parameter): this
  request's fault, not the server's health.
- `RateLimited`: 429 once the retries are spent.
- `BackendFailed`: this request failed but the next may work: 5xx once the retries are spent,
  connection errors, malformed or truncated streams.

Retries are ours, not the SDK's, so that every fault before the first text is retried the same way
and one call never sends more than `max_retries + 1` requests: 408/409/429/5xx (honouring
Retry-After and x-should-retry), connection errors, a server silent for its share of `timeout_s`,
and a malformed, cut or unfinished stream. Once text has been yielded nothing is retried: the
caller would get two answers spliced together.

Messages carry the status code, the server's request id and its own words (its `message` or
FastAPI's `detail`) for the logs, never the API key.

Servers differ in what they accept: `transformers serve` refuses `top_k` with HTTP 422
"Unexpected fields in the request: {'top_k'}". A 400/422 that names a field we sent but could do
without (`top_k`, `top_p`, `temperature`, `stream_options`; `max_completion_tokens` becomes
`max_tokens`) is retried at once without it, once per field, and the field is remembered: it is
never sent again, and the sampling key it carried is listed in `unsupported`, so
`/llm-settings show` says the server does not honour it.

`start()` reads the server's context window from `GET /models` where it publishes one (vLLM's
`max_model_len`) unless the operator set it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence

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
    Prompt,
    RateLimited,
    RequestRejected,
    StreamEvent,
)
from bot.sampling import SamplingSettings

log = logging.getLogger(__name__)

# vLLM and most OpenAI-compatible servers accept any bearer token when they are run without one,
# but the SDK insists on some key.
PLACEHOLDER_KEY = "EMPTY"
# Connecting is quick or it is not happening; a dead host should fail over fast.
_CONNECT_TIMEOUT_S = 5.0
# Chat-template tokens around each message (OpenAI documents 3 for its models; one spare) and the
# tokens that prime the reply (e.g. "<|im_start|>assistant<|im_sep|>").
_TOKENS_PER_MESSAGE = 4
_TOKENS_REPLY_PRIMING = 3
_MAX_SERVER_MESSAGE = 300
# Backoff between attempts when the server does not say (as the SDK does it): 0.5 s, 1 s, 2 s, …
_INITIAL_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 8.0
# Statuses worth another attempt (the SDK's list); others are the request's or the key's fault.
_RETRY_STATUSES = frozenset({408, 409, 429})
# Request fields a server may refuse that the answer can do without -> the sampling key each
# carries (None: no setting is lost).
_OPTIONAL_FIELDS: dict[str, str | None] = {
    "top_k": "top_k",
    "top_p": "top_p",
    "temperature": "temperature",
    "max_completion_tokens": None,  # sent as max_tokens instead
    "stream_options": None,  # only the token usage is lost
}
_FIELD_STATUSES = frozenset({400, 422})
# How servers word a field they do not take (pydantic's "Extra inputs are not permitted", ...).
_REFUSAL = re.compile(
    r"unexpected|unknown|unsupported|not supported|does not support|unrecognized|extra"
    r"|not permitted|not allowed",
    re.IGNORECASE,
)
# Where servers publish the context window in GET /models (vLLM: max_model_len).
_CONTEXT_FIELDS = ("max_model_len", "context_length", "context_window", "max_context_length")


class _Retryable(Exception):
    """An attempt failed before any text, in a way that another attempt may not."""

    def __init__(self, error: LLMError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said


class _FieldRefused(Exception):
    """The server refused a request field we can do without."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(field)
        self.field = field
        self.detail = detail


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
        discover_context: bool = False,
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
        self._discover_context = discover_context
        self._refused: set[str] = set()  # request fields this server refused: never sent again
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
        keys = {_OPTIONAL_FIELDS[field] for field in self._refused}
        if not self._send_top_k:
            keys.add("top_k")
        return frozenset(key for key in keys if key is not None)

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt:
        """The messages as they will be sent, with the estimate of `count_each` (no tokenizer:
        the server encodes them)."""
        tokens = sum(self.count_each(messages)) or _TOKENS_REPLY_PRIMING  # the priming at least
        return Prompt(messages=list(messages), tokens=tokens, ids=None)

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]:
        """An upper bound on each message's prompt tokens, without a tokenizer.

        OpenAI's tokenizers (cl100k, o200k) and EXAONE's are byte-level BPE: every token stands
        for at least one UTF-8 byte of the text, so a text never takes more tokens than it has
        bytes (one-byte tokens are the worst case). Role and content are counted that way, plus
        the chat template's special tokens per message; the first message also carries the reply
        priming. This overestimates (English averages ~4 bytes a token, Korean ~2-3), which only
        means history is trimmed a little early; underestimating would make the server reject
        the prompt.
        """
        counts = [
            _TOKENS_PER_MESSAGE
            + len(message["role"].encode("utf-8"))
            + len(message["content"].encode("utf-8"))
            for message in messages
        ]
        if counts:
            counts[0] += _TOKENS_REPLY_PRIMING
        return counts

    async def start(self) -> None:
        """Build the client. No network call: `supportbot doctor` checks the key separately."""
        if self._client is not None:
            return
        if self._api_key is None and self._base_url is None:
            raise BackendUnavailable(f"{self._name}: no API key configured")
        self._client = openai.AsyncOpenAI(
            api_key=self._api_key or PLACEHOLDER_KEY,
            base_url=self._base_url,
            # read bounds the wait for the response headers and any silence inside the stream;
            # the first-token deadline in stream() bounds the whole wait including retries.
            timeout=openai.Timeout(
                self._timeout_s, connect=min(_CONNECT_TIMEOUT_S, self._timeout_s)
            ),
            # stream() retries, also what the SDK would not (a silent or malformed stream).
            max_retries=0,
        )
        if self._discover_context:
            await self._read_context_window(self._client)

    async def _read_context_window(self, client: openai.AsyncOpenAI) -> None:
        """The server's context window for our model from GET /models, where it says (vLLM's
        `max_model_len`); the configured value stays when it does not or cannot answer."""
        try:
            async with asyncio.timeout(min(_CONNECT_TIMEOUT_S, self._timeout_s)):
                page = await client.models.list()
        except (openai.OpenAIError, TimeoutError) as exc:
            log.info("%s: no context window from GET /models (%s)", self._name, type(exc).__name__)
            return
        for entry in page.data:
            if entry.id != self._model:
                continue
            extra = entry.model_extra or {}
            for field in _CONTEXT_FIELDS:
                value = extra.get(field)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    self._context_window = value
                    log.info("%s: context window %d (the server's %s)", self._name, value, field)
                    return

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        """Sends `prompt.messages` (the server encodes them; `prompt.ids` are not used)."""
        messages = prompt.messages
        client = self._client
        if client is None:
            raise BackendUnavailable(f"{self._name}: not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        started = time.perf_counter()
        attempt = 0
        while True:
            # Each attempt may wait its share of what is left of the deadline for the first text,
            # so a server that hangs on one request still leaves time for the next ones.
            share = (deadline - loop.time()) / (self._max_retries + 1 - attempt)
            answered: list[bool] = []  # set once text has been yielded: no retry after that
            attempt_events = self._attempt(
                client, messages, sampling, loop.time() + share, started, answered
            )
            try:
                # aclosing: a consumer that stops early closes the HTTP response now.
                async with contextlib.aclosing(attempt_events) as events:
                    async for event in events:
                        yield event
                return
            except _FieldRefused as refused:
                # Retried at once without the field; each field is refused once at most, so
                # this ends. Logged once per field: from now on it is not sent.
                self._refused.add(refused.field)
                log.warning(
                    "%s does not accept %r (%s); sending requests without it from now on",
                    self._name,
                    refused.field,
                    refused.detail,
                )
                continue
            except _Retryable as failed:
                delay = self._backoff(attempt, failed.retry_after, deadline - loop.time())
                if answered or attempt >= self._max_retries or delay is None:
                    raise failed.error from failed.__cause__
                attempt += 1
                log.info(
                    "%s: %s; retrying in %.2fs (retry %d of %d)",
                    self._name,
                    failed.error,
                    delay,
                    attempt,
                    self._max_retries,
                )
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None, remaining: float) -> float | None:
        """Seconds to wait before the next attempt, or None when no attempt would fit."""
        attempts_left = self._max_retries - attempt
        if retry_after is not None and 0 <= retry_after <= 60:
            # The server's word, unless the deadline comes first: then another try is pointless.
            return float(retry_after) if retry_after < remaining else None
        jitter = 1 - 0.25 * random.random()  # noqa: S311 - spreading retries, not cryptography
        delay = min(_INITIAL_BACKOFF_S * 2.0**attempt, _MAX_BACKOFF_S) * jitter
        # At most half of what each remaining attempt would get, so the attempts still happen.
        return min(delay, remaining / (2 * max(attempts_left, 1)))

    async def _attempt(
        self,
        client: openai.AsyncOpenAI,
        messages: Sequence[ChatMessage],
        sampling: SamplingSettings,
        attempt_deadline: float,
        started: float,
        answered: list[bool],
    ) -> AsyncGenerator[StreamEvent, None]:
        """One request: its events, or _Retryable when it failed before any text."""
        deadline: float | None = attempt_deadline
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
                            answered.append(True)
                        yield Delta(text)
        finally:
            # Also runs when the consumer stops early (aclose): this closes the HTTP response,
            # so the server stops generating for nobody.
            if chunks is not None:
                await chunks.close()

        if finish_reason is None:
            # A clean end of the body without a finish_reason: a proxy or server cut the answer.
            raise _Retryable(
                BackendFailed(f"{self._name}: stream ended before the answer was finished")
            )
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
        omit = openai.omit
        extra_body: dict[str, object] = {}
        temperature: float | openai.Omit
        if sampling.do_sample:
            temperature = sampling.temperature
            top_p: float | openai.Omit = sampling.top_p
            if self._send_top_k:
                extra_body["top_k"] = sampling.top_k
        else:
            # Greedy decoding as far as the API allows: temperature 0 picks the likeliest token,
            # but OpenAI does not promise identical outputs for identical requests (batching and
            # hardware nondeterminism), so do_sample=false is only near-deterministic there.
            # vLLM treats temperature 0 as greedy and ignores top_p/top_k, so neither is sent.
            temperature, top_p = 0.0, omit
        refused = self._refused
        max_tokens: int | openai.Omit = omit
        max_completion_tokens: int | openai.Omit = sampling.max_new_tokens
        if "max_completion_tokens" in refused:
            max_tokens, max_completion_tokens = sampling.max_new_tokens, omit
        extra_body = {k: v for k, v in extra_body.items() if k not in refused}
        try:
            return await client.chat.completions.create(
                model=self._model,
                messages=[_message_param(m) for m in messages],
                temperature=omit if "temperature" in refused else temperature,
                top_p=omit if "top_p" in refused else top_p,
                max_completion_tokens=max_completion_tokens,
                max_tokens=max_tokens,
                stream=True,
                # The last chunk then carries the usage.
                stream_options=omit if "stream_options" in refused else {"include_usage": True},
                extra_body=extra_body or None,
            )
        except openai.APIStatusError as err:
            field = self._refused_field(err, sent=self._sent_fields(sampling))
            if field is None:
                raise
            raise _FieldRefused(field, self._status_detail(err)) from None

    def _sent_fields(self, sampling: SamplingSettings) -> set[str]:
        """The optional fields a request with these settings carries."""
        sent = {"max_completion_tokens", "stream_options", "temperature"}
        if sampling.do_sample:
            sent.add("top_p")
            if self._send_top_k:
                sent.add("top_k")
        return sent - self._refused

    def _refused_field(self, err: openai.APIStatusError, *, sent: set[str]) -> str | None:
        """The optional field a 400/422 names, when it names one we sent."""
        if err.status_code not in _FIELD_STATUSES:
            return None
        text = self._server_text(err)
        if not _REFUSAL.search(text):
            return None  # e.g. a value out of range: the field is understood, keep it
        for field in sorted(sent):
            if re.search(rf"(?<![A-Za-z_]){re.escape(field)}(?![A-Za-z_])", text):
                return field
        return None

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Turn SDK and timeout errors into the port's errors, with no API key in the text."""
        try:
            yield
        except (LLMError, _Retryable):
            raise
        except TimeoutError:
            raise _Retryable(
                BackendTimeout(f"{self._name}: no answer within {self._timeout_s:g}s")
            ) from None
        except openai.APITimeoutError as err:
            raise _Retryable(
                BackendTimeout(
                    f"{self._name}: timed out waiting for the server ({self._timeout_s:g}s)"
                )
            ) from err
        except openai.APIStatusError as err:
            # `from None`: the SDK's own exception text quotes the server, which may echo the key.
            error = self._status_error(err)
            if self._should_retry(err):
                raise _Retryable(error, _retry_after(err.response.headers)) from None
            raise error from None
        except openai.APIConnectionError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ else "unknown"
            raise _Retryable(BackendFailed(f"{self._name}: connection failed ({cause})")) from err
        except openai.APIError as err:  # an error event inside the stream, or a bad payload
            raise _Retryable(
                BackendFailed(f"{self._name}: error in stream: {self._server_text(err)}")
            ) from None
        except ValueError as err:  # the SSE data line was not JSON
            raise _Retryable(
                BackendFailed(f"{self._name}: malformed stream ({type(err).__name__})")
            ) from err
        except openai.OpenAIError as err:
            raise BackendFailed(f"{self._name}: {type(err).__name__}") from None

    @staticmethod
    def _should_retry(err: openai.APIStatusError) -> bool:
        if isinstance(err, openai.RateLimitError) and err.code == "insufficient_quota":
            return False  # no waiting fixes an empty balance
        should: str | None = err.response.headers.get("x-should-retry")
        if should in ("true", "false"):  # OpenAI says so itself on some errors
            return should == "true"
        return err.status_code in _RETRY_STATUSES or err.status_code >= 500

    def _status_detail(self, err: openai.APIStatusError) -> str:
        detail = f"HTTP {err.status_code}"
        if err.code:
            detail += f" {err.code}"
        return detail + f" (request id {err.request_id or 'none'}): {self._server_text(err)}"

    def _status_error(self, err: openai.APIStatusError) -> LLMError:
        message = f"{self._name}: {self._status_detail(err)}"
        if isinstance(
            err,
            openai.AuthenticationError | openai.PermissionDeniedError | openai.NotFoundError,
        ):
            return BackendUnavailable(message)
        if isinstance(err, openai.RateLimitError) and err.code == "insufficient_quota":
            return BackendUnavailable(message)
        if isinstance(err, openai.RateLimitError):
            return RateLimited(message)
        if 400 <= err.status_code < 500 and err.status_code not in _RETRY_STATUSES:
            # This request's fault (too long, a bad parameter): the server itself is fine.
            too_long = err.code == "context_length_exceeded" or (
                "maximum context length" in self._server_text(err).lower()  # vLLM's wording
            )
            return RequestRejected(message, too_long=too_long)
        return BackendFailed(message)

    def _server_text(self, err: openai.APIError) -> str:
        """The server's own message, shortened, with our key blanked out.

        Servers may echo the key (OpenAI echoes a masked one on 401; proxies may not mask it).
        """
        body = err.body
        text: object = None
        if isinstance(body, dict):
            # OpenAI and vLLM: "message"; FastAPI servers (transformers serve): "detail".
            text = body.get("message") or body.get("detail")
            if isinstance(text, list | dict):  # FastAPI's validation errors
                text = str(text)
        if not isinstance(text, str) or not text:
            text = err.message
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return text[:_MAX_SERVER_MESSAGE]


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After (seconds) or OpenAI's retry-after-ms, when the server sent one."""
    with contextlib.suppress(TypeError, ValueError):
        milliseconds = headers.get("retry-after-ms")
        if milliseconds is not None:
            return float(milliseconds) / 1000
        seconds = headers.get("retry-after")
        if seconds is not None:
            return float(seconds)
    return None  # absent, or an HTTP date: our own backoff then


def _message_param(message: ChatMessage) -> ChatCompletionMessageParam:
    role, content = message["role"], message["content"]
    if role == "system":
        return {"role": "system", "content": content}
    if role == "user":
        return {"role": "user", "content": content}
    if role == "assistant":
        return {"role": "assistant", "content": content}
    raise BackendFailed(f"unsupported message role {role!r}")
