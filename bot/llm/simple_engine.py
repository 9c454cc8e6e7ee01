"""The one-at-a-time engine (LLM_ENGINE=simple): `generate()` on one worker thread, streamed.

Everything that touches torch runs on one worker thread, so the event loop never waits on the
model and the model runs one generation at a time. The worker talks to the loop only through
`call_soon_threadsafe`, so it never blocks on a consumer that has gone away, and a stopping
criterion ends a generation nobody reads any more. The loop never takes the tokenizer lock: the
prompt comes encoded (`encode()`, which callers run off the loop) and decoding is the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from bot.llm.base import (
    BackendFailed,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    Prompt,
    StreamEvent,
)
from bot.llm.loader import LoadedModel, Loader, free_memory, open_model
from bot.sampling import SamplingSettings

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class _Text:
    """One generated token's worth of printable text (often empty while a word is incomplete)."""

    text: str


@dataclass(frozen=True, slots=True)
class _Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


_WorkerEvent = _Text | _Done | _Failed
_Post = Callable[[_WorkerEvent], None]


@functools.cache
def _load_streamer_class() -> type[Any]:
    """Build the streamer class on first use: transformers is imported only with a model."""
    from transformers import TextStreamer

    class QueueStreamer(TextStreamer):
        """TextStreamer's word-boundary decoding, pushed to the loop instead of printed.

        `put` runs once per token, so every token posts an event (empty while a word or a UTF-8
        sequence is still incomplete): the consumer sees progress even before text is printable.
        """

        def __init__(self, tokenizer: Any, post: _Post, lock: threading.Lock) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self._post = post
            self._lock = lock

        def put(self, value: Any) -> None:
            with self._lock:
                super().put(value)  # type: ignore[no-untyped-call]  # unannotated upstream

        def end(self) -> None:
            with self._lock:
                super().end()  # type: ignore[no-untyped-call]  # unannotated upstream

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self._post(_Text(text))

    return QueueStreamer


@functools.cache
def _load_cancel_criteria_class() -> type[Any]:
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        """Stops generation once the consumer has gone (aclose, timeout, shutdown)."""

        def __init__(self, event: threading.Event) -> None:
            self._event = event

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            stop = self._event.is_set()
            return torch.full(
                (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
            )

    return Cancelled


def generate_kwargs(sampling: SamplingSettings) -> dict[str, Any]:
    """Sampling as transformers' text-generation pipeline hands it to generate()."""
    # A temperature below GREEDY_BELOW_TEMPERATURE is decoded greedily, its limit: dividing the
    # logits by it would overflow to inf/NaN.
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": not sampling.greedy,
    }
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    # Greedy ignores them; passing them anyway only earns "flags are not valid" warnings.
    return kwargs


class SimpleEngine:
    """A loaded causal LM answering one question at a time; implements the LLM port.

    Streams queue for the single worker; `first_token_timeout_s` bounds the wait for the first
    token (queueing and prefill included) and for every later one, so an overloaded or stalled
    device raises BackendTimeout instead of hanging the caller.
    """

    def __init__(self, loader: Loader, *, first_token_timeout_s: float = 60.0) -> None:
        if first_token_timeout_s <= 0:
            raise ValueError("first_token_timeout_s must be positive")
        self._loader = loader
        self._first_token_timeout_s = first_token_timeout_s
        self._loaded: LoadedModel | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._start_lock = asyncio.Lock()
        self._active: set[threading.Event] = set()

    @property
    def name(self) -> str:
        return self._loader.name

    @property
    def context_window(self) -> int:
        if self._loader.context_tokens is not None:
            return self._loader.context_tokens
        return self.loaded.context_window

    @property
    def unsupported(self) -> frozenset[str]:
        return frozenset()

    @property
    def loaded(self) -> LoadedModel:
        """The model, once started (BackendUnavailable before start() and after aclose())."""
        if self._loaded is None:
            raise BackendUnavailable(f"{self.name} is not loaded; call start() first")
        return self._loaded

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt:
        return self.loaded.encode(messages)

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.loaded.count_each(messages)

    async def start(self) -> None:
        async with self._start_lock:
            if self._loaded is None:
                self._loaded = await open_model(self._loader)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-llm")

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        loaded = self.loaded
        executor = self._executor
        if executor is None:
            raise BackendUnavailable(f"{self.name} is closed")
        began = time.monotonic()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_WorkerEvent] = asyncio.Queue()

        def post(event: _WorkerEvent) -> None:
            # RuntimeError: the loop is closed, so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        cancel = threading.Event()
        self._active.add(cancel)
        try:
            try:
                loop.run_in_executor(
                    executor, self._generate, loaded, prompt, sampling, post, cancel
                )
            except RuntimeError as exc:  # the executor was shut down by aclose()
                raise BackendUnavailable(f"{self.name} is closed") from exc

            first_text_s: float | None = None
            while True:
                # The first token must come within the timeout (queueing and prefill included),
                # and so must every later one: a stalled device never hangs the caller.
                try:
                    event = await asyncio.wait_for(queue.get(), self._first_token_timeout_s)
                except TimeoutError:
                    raise BackendTimeout(
                        f"{self.name} produced no token within {self._first_token_timeout_s:g}s"
                    ) from None
                if isinstance(event, _Text):
                    if event.text:
                        if first_text_s is None:
                            first_text_s = time.monotonic() - began
                        yield Delta(event.text)
                elif isinstance(event, _Done):
                    if cancel.is_set():  # only aclose() sets it while we are still reading
                        raise BackendUnavailable(f"{self.name} was closed while generating")
                    yield Finished(
                        backend=self.name,
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        first_token_s=first_text_s,
                        total_s=time.monotonic() - began,
                    )
                    return
                else:
                    raise BackendFailed(
                        f"{self.name} failed while generating: "
                        f"{type(event.error).__name__}: {event.error}"
                    ) from event.error
        finally:
            # Whether we finished, failed, timed out or the consumer left early: free the device.
            cancel.set()
            self._active.discard(cancel)

    async def aclose(self) -> None:
        for cancel in list(self._active):
            cancel.set()
        executor, self._executor = self._executor, None
        loaded, self._loaded = self._loaded, None
        if executor is not None:
            # Cancelled generations end at their next token; wait so the memory is really free.
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        if loaded is not None:
            device = loaded.device
            del loaded
            free_memory(device)

    # -- worker thread ------------------------------------------------------------------------

    def _generate(
        self,
        loaded: LoadedModel,
        prompt: Prompt,
        sampling: SamplingSettings,
        post: _Post,
        cancel: threading.Event,
    ) -> None:
        if cancel.is_set():  # the caller gave up while this job waited its turn
            return
        import torch
        from transformers import StoppingCriteriaList

        try:
            # A prompt encoded by another backend (no ids) is encoded here, on the worker.
            ids = prompt.ids if prompt.ids is not None else loaded.encode(prompt.messages).ids
            input_ids = torch.tensor([cast("list[int]", ids)], device=loaded.device)
            attention_mask = torch.ones_like(input_ids)
            prompt_tokens = int(input_ids.shape[-1])
            streamer = _load_streamer_class()(loaded.tokenizer, post, loaded.tokenizer_lock)
            criteria = StoppingCriteriaList([_load_cancel_criteria_class()(cancel)])
            # Every causal LM has generate(), but it is typed against a protocol that
            # PreTrainedModel does not declare.
            model: Any = loaded.model
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    streamer=streamer,
                    stopping_criteria=criteria,
                    eos_token_id=loaded.eos_token_ids,
                    pad_token_id=loaded.pad_token_id,
                    **generate_kwargs(sampling),
                )
            sequences = cast("torch.Tensor", output)
            post(_Done(prompt_tokens, int(sequences.shape[-1]) - prompt_tokens))
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                # Give the cached blocks back so the next, maybe shorter, request can run.
                torch.cuda.empty_cache()
            post(_Failed(exc))
