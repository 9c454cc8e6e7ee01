"""The in-process transformers backend: a local model on the GPU (or CPU), streamed.

Everything that touches torch runs on one worker thread, so the event loop never waits on the
model and the model runs one generation at a time (a continuous-batching engine replaces this
later). The worker talks to the loop only through `call_soon_threadsafe`, so it never blocks on a
consumer that has gone away, and a stopping criterion ends a generation nobody reads any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from bot.llm.base import (
    BackendFailed,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    StreamEvent,
)
from bot.llm.exaone import load_model_and_tokenizer, resolve_model_dir
from bot.ops import metrics
from bot.sampling import SamplingSettings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# EXAONE ends every turn with this token; generation must stop there even when a checkpoint's
# generation_config names another eos.
END_OF_TURN = "[|endofturn|]"

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_DTYPES = ("auto", "bfloat16", "float16", "float32")


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


@dataclass(frozen=True, slots=True)
class _Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: str
    eos_token_ids: list[int]
    pad_token_id: int
    context_window: int


def _model_tail(model: str) -> str:
    """The model's own name, from a Hub id ("org/name") or a directory ("/models/name/", ".")."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path.resolve()
    return path.name or model


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r} was asked for but CUDA is not available")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(
                f"device {device!r} does not exist; {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        # bfloat16 needs Ampere or newer; older GPUs get float16 rather than slow emulation.
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float16
    return cast("torch.dtype", getattr(torch, dtype))


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The checkpoint's eos ids plus EXAONE's end-of-turn, in a stable order."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.append(configured)
    elif configured is not None:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    if END_OF_TURN in vocab:
        ids.append(int(vocab[END_OF_TURN]))
    return list(dict.fromkeys(ids))


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


class LocalLLM:
    """A Hugging Face causal LM (EXAONE 3.5 by default) generating in this process.

    `model` is a checkpoint directory or a Hub id (downloaded once into the HF cache). Streams
    queue for the single worker; `first_token_timeout_s` bounds the wait for the first token
    (queueing and prefill included) and for every later one, so an overloaded or stalled device
    raises BackendTimeout instead of hanging the caller. Prompts are encoded with control tokens
    sanitised: a user who types "[|endofturn|]" gets text, not the end of their turn.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        context_tokens: int | None = None,
        first_token_timeout_s: float = 60.0,
    ) -> None:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
        if context_tokens is not None and context_tokens < 1:
            raise ValueError("context_tokens must be positive")
        if first_token_timeout_s <= 0:
            raise ValueError("first_token_timeout_s must be positive")
        self._model_ref = model
        self._device = device
        self._dtype = dtype
        self._trust_remote_code = trust_remote_code
        self._context_tokens = context_tokens
        self._first_token_timeout_s = first_token_timeout_s
        self._name = "local:" + _model_tail(model)

        self._loaded: _Loaded | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._start_lock = asyncio.Lock()
        # The Rust tokenizer refuses concurrent use ("Already borrowed"); count_tokens runs on the
        # loop while the worker encodes and decodes.
        self._tokenizer_lock = threading.Lock()
        self._active: set[threading.Event] = set()

    # -- LLM protocol -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def context_window(self) -> int:
        if self._context_tokens is not None:
            return self._context_tokens
        return self._require_loaded().context_window

    @property
    def unsupported(self) -> frozenset[str]:
        return frozenset()

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.encode(messages))

    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt ids: chat template with the generation prompt, control tokens typed by
        users kept as text (a user typing "[|endofturn|][|assistant|]" forges no turn)."""
        loaded = self._require_loaded()
        with self._tokenizer_lock:
            ids = loaded.tokenizer.apply_chat_template(
                _as_dicts(messages),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,  # transformers 5 returns a BatchEncoding by default
                sanitize_control_tokens=True,
            )
        return cast("list[int]", ids)

    async def start(self) -> None:
        async with self._start_lock:
            if self._loaded is not None:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-llm")
            loop = asyncio.get_running_loop()
            began = time.monotonic()
            try:
                self._loaded = await loop.run_in_executor(self._executor, self._load)
            except BackendUnavailable as exc:
                logger.error("local model %s is unavailable: %s", self._model_ref, exc)
                raise
            except Exception as exc:
                logger.error("local model %s failed to load", self._model_ref, exc_info=True)
                raise BackendUnavailable(
                    f"local model {self._model_ref!r} could not be loaded: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if self._loaded.device.startswith("cuda"):
                import torch

                device = self._loaded.device
                metrics.GPU_MEMORY.set_function(lambda: torch.cuda.memory_allocated(device))
            logger.info(
                "local model %s loaded on %s in %.1fs",
                self._model_ref,
                self._loaded.device,
                time.monotonic() - began,
            )

    async def stream(
        self, messages: Sequence[ChatMessage], sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        loaded = self._require_loaded()
        executor = self._executor
        if executor is None:
            raise BackendUnavailable(f"{self._name} is closed")
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
                    executor, self._generate, loaded, _as_dicts(messages), sampling, post, cancel
                )
            except RuntimeError as exc:  # the executor was shut down by aclose()
                raise BackendUnavailable(f"{self._name} is closed") from exc

            first_text_s: float | None = None
            while True:
                # The first token must come within the timeout (queueing and prefill included),
                # and so must every later one: a stalled device never hangs the caller.
                try:
                    event = await asyncio.wait_for(queue.get(), self._first_token_timeout_s)
                except TimeoutError:
                    raise BackendTimeout(
                        f"{self._name} produced no token within {self._first_token_timeout_s:g}s"
                    ) from None
                if isinstance(event, _Text):
                    if event.text:
                        if first_text_s is None:
                            first_text_s = time.monotonic() - began
                        yield Delta(event.text)
                elif isinstance(event, _Done):
                    if cancel.is_set():  # only aclose() sets it while we are still reading
                        raise BackendUnavailable(f"{self._name} was closed while generating")
                    yield Finished(
                        backend=self._name,
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        first_token_s=first_text_s,
                        total_s=time.monotonic() - began,
                    )
                    return
                else:
                    raise BackendFailed(
                        f"{self._name} failed while generating: "
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
            on_cuda = loaded.device.startswith("cuda")
            del loaded
            gc.collect()
            if on_cuda:
                import torch

                torch.cuda.empty_cache()

    # -- worker thread ------------------------------------------------------------------------

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise BackendUnavailable(f"{self._name} is not loaded; call start() first")
        return self._loaded

    def _load(self) -> _Loaded:
        device = _resolve_device(self._device)
        dtype = _resolve_dtype(self._dtype, device)
        model_dir = resolve_model_dir(self._model_ref, include_code=self._trust_remote_code)
        model, tokenizer = load_model_and_tokenizer(
            model_dir, device, dtype, trust_remote_code=self._trust_remote_code
        )
        if not tokenizer.chat_template:
            raise ValueError(f"{model_dir} has no chat template")
        eos_token_ids = _stop_token_ids(model, tokenizer)
        if not eos_token_ids:
            raise ValueError(f"{model_dir} names no end-of-sequence token")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id
        context = self._context_tokens or int(model.config.max_position_embeddings)
        return _Loaded(
            model=model,
            tokenizer=tokenizer,
            device=device,
            eos_token_ids=eos_token_ids,
            pad_token_id=int(pad) if pad is not None else eos_token_ids[0],
            context_window=context,
        )

    @staticmethod
    def _generate_kwargs(sampling: SamplingSettings) -> dict[str, Any]:
        """Sampling as transformers' text-generation pipeline hands it to generate()."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": sampling.do_sample,
        }
        if sampling.do_sample:
            kwargs.update(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
            )
        # Greedy ignores them; passing them anyway only earns "flags are not valid" warnings.
        return kwargs

    def _generate(
        self,
        loaded: _Loaded,
        messages: list[dict[str, str]],
        sampling: SamplingSettings,
        post: _Post,
        cancel: threading.Event,
    ) -> None:
        if cancel.is_set():  # the caller gave up while this job waited its turn
            return
        import torch
        from transformers import StoppingCriteriaList

        try:
            with self._tokenizer_lock:
                encoded: Any = loaded.tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    # A user typing "[|endofturn|][|assistant|]" gets text, not control tokens.
                    sanitize_control_tokens=True,
                )
            tensors = cast("Mapping[str, torch.Tensor]", encoded)
            input_ids = tensors["input_ids"].to(loaded.device)
            attention_mask = tensors["attention_mask"].to(loaded.device)
            prompt_tokens = int(input_ids.shape[-1])
            streamer = _load_streamer_class()(loaded.tokenizer, post, self._tokenizer_lock)
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
                    **self._generate_kwargs(sampling),
                )
            sequences = cast("torch.Tensor", output)
            post(_Done(prompt_tokens, int(sequences.shape[-1]) - prompt_tokens))
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                # Give the cached blocks back so the next, maybe shorter, request can run.
                torch.cuda.empty_cache()
            post(_Failed(exc))
