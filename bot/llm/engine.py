"""The continuous-batching engine: every channel's question decoded together on one resident model.

transformers' continuous batching (`model.init_continuous_batching`) runs a generation thread
with a paged KV cache; requests join and leave the running batch at every step, so the tenth
channel does not wait for nine whole answers. The engine decodes greedily (`do_sample=False`) and
`sampler.RequestSampler` marks the token each sampling request drew, so greedy requests get the
plain argmax with no processor at all (tests check it equals `generate` token for token beside
sampling requests), and no request's values can turn a step into inf/NaN and fail the batch: a
temperature below `GREEDY_BELOW_TEMPERATURE` is decoded greedily, its mathematical limit.

Tokens arrive on the event loop through `register_result_handler`, registered before the request
is added under an id of our own, so no early output can miss it. Each output carries every token
so far, so the handler only keeps the latest and wakes the stream; text is decoded incrementally,
once per wake-up whatever the number of tokens that arrived. A bounded number of requests
may be in the engine at once: past it, the request raises BackendBusy, so the chain sends it to
GPT or the user is told how many are ahead.

The attention it runs is chosen at start by bot/llm/attention.py: flash on a GPU when it is
installed or pre-fetched (else sdpa, with a warning), sdpa per request on a CPU
(bot/llm/cpu_attention.py); the start-up log line names it and says whether CUDA graphs are on.

An error in a generation step (a CUDA out-of-memory, say) fails the requests in the batch and ends
transformers' generation loop for good; the next request restarts the loop on the same model, so
one bad step does not take the local model away until the process restarts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any, cast

from bot.llm.attention import AttentionMode
from bot.llm.base import (
    BackendBusy,
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
from bot.ops import metrics
from bot.ops.threads import on_own_thread
from bot.sampling import SamplingSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# On a CPU the paged cache holds this many tokens for each request the engine admits (prompt and
# answer) besides the free share transformers keeps (it starts no new prompt while less than
# that share of the cache is free), and never less than 64 pages.
CPU_CACHE_TOKENS_PER_REQUEST = 512
# transformers' defaults, set here because the cache's size depends on them
_CPU_PAGE_TOKENS = 256
_CPU_CACHE_FREE_SHARE = 0.15
_CPU_CACHE_MIN_TOKENS = 64 * _CPU_PAGE_TOKENS
_CPU_MEMORY_SHARE = 0.6  # of the host's free memory, as transformers assumes on a CPU

# transformers.generation.continuous_batching.utils logs under this name.
_ENGINE_LOGGER = "ContinuousBatchingLogger"


class IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas, in O(new tokens) per step.

    It decodes a short window (from `prefix` to the end) and emits what goes beyond the window's
    previous text, holding back while the tail is an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into emitted text

    def _decode(self, ids: Sequence[int]) -> str:
        return cast(str, self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def push(self, tokens: Sequence[int]) -> str:
        if len(tokens) <= self._read:
            return ""
        before = self._decode(tokens[self._prefix : self._read])
        after = self._decode(tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(tokens)
        return after[len(before) :]

    def flush(self, tokens: Sequence[int]) -> str:
        """Whatever is left at the end, replacement characters included."""
        before = self._decode(tokens[self._prefix : self._read])
        after = self._decode(tokens[self._prefix :])
        self._prefix = self._read = len(tokens)
        return after[len(before) :] if len(after) > len(before) else ""


def _route_engine_logs() -> None:
    """Send the engine's log records through the bot's logging like everyone else's.

    transformers gives its continuous-batching logger a stderr handler of its own and stops it
    from propagating, so its lines (a crash's traceback included) would skip the redaction
    filter, LOG_FORMAT=json and the correlation id. It does so once, at import, which has
    happened by now.
    """
    engine_logger = logging.getLogger(_ENGINE_LOGGER)
    engine_logger.handlers.clear()
    engine_logger.propagate = True


def _accepting(manager: Any) -> bool:
    """Whether the engine's loop is running and taking requests (not dead of an error)."""
    status = manager.background_thread_status
    return bool(manager.is_running()) and status.can_accept_new_requests() is None


def _drop_handler_later(manager: Any, request_id: str, delay_s: float = 5.0) -> None:
    """Forget a cancelled request's result handler.

    transformers removes a handler only when its request finishes, and a cancelled one never
    does. Outputs still in flight must not fall back to the shared output queue (it would grow
    without bound), so the handler becomes a no-op first and is removed a little later.
    """
    router = manager.output_router
    with router._lock:
        entry = router.result_handlers.get(request_id)
        if entry is None:
            return
        router.result_handlers[request_id] = (lambda _output: None, entry[1])

    def drop() -> None:
        with router._lock:
            router.result_handlers.pop(request_id, None)

    entry[1].call_later(delay_s, drop)


def _request_kwargs(sampling: SamplingSettings) -> dict[str, Any]:
    """What RequestSampler reads per request: temperature 0 means greedy."""
    if sampling.greedy:
        return {"temperature": 0.0, "top_k": 1, "top_p": 1.0}
    return {
        "temperature": float(sampling.temperature),
        "top_k": int(sampling.top_k),
        "top_p": float(sampling.top_p),
    }


class _Latest:
    """The newest output of one request and a wake-up for its stream: outputs carry every token
    so far, so older ones are dropped unread. A terminal output (finished or failed) is never
    replaced: nothing comes after it."""

    __slots__ = ("_event", "_output")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._output: Any = None

    def put(self, output: Any) -> None:  # on the event loop (transformers' call_soon_threadsafe)
        current = self._output
        if current is not None and (current.error is not None or current.is_finished()):
            return
        self._output = output
        self._event.set()

    async def get(self) -> Any:
        await self._event.wait()
        self._event.clear()
        return self._output


class BatchingEngine:
    """A loaded causal LM serving every stream from one continuous batch; implements the port.

    `warmup_timeout_s` bounds the warm-up answer in `start()`: an engine that cannot answer it
    in time is not started (BackendTimeout), and the chain falls back.
    """

    def __init__(
        self,
        loader: Loader,
        *,
        max_in_flight: int = 64,
        warmup_timeout_s: float = 60.0,
        attention: AttentionMode = "auto",
        cpu_step_tokens: int = 2048,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if warmup_timeout_s <= 0:
            raise ValueError("warmup_timeout_s must be positive")
        self._loader = loader
        self.max_in_flight = max_in_flight
        self._warmup_timeout_s = warmup_timeout_s
        self._attention: AttentionMode = attention
        self._cpu_step_tokens = cpu_step_tokens  # prompt tokens per step on a CPU (see below)
        self._loaded: LoadedModel | None = None
        self._manager: Any = None
        self._in_flight = 0
        self._start_lock = asyncio.Lock()
        self._revive_lock = asyncio.Lock()
        # Request ids are ours, so the result handler is in place before the request exists.
        self._ids = (f"{uuid.uuid4().hex[:8]}-{n}" for n in itertools.count())

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
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def loaded(self) -> LoadedModel:
        """The model, once started (BackendUnavailable before start() and after aclose())."""
        if self._loaded is None:
            raise BackendUnavailable(f"{self.name} is not loaded; call start() first")
        return self._loaded

    @property
    def manager(self) -> Any:
        """transformers' ContinuousBatchingManager (None before start() and after aclose())."""
        return self._manager

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt:
        return self.loaded.encode(messages)

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.loaded.count_each(messages)

    async def start(self) -> None:
        async with self._start_lock:
            if self._loaded is None:
                self._loaded = await open_model(self._loader)
            if self._manager is not None:
                return
            began = time.monotonic()
            try:
                self._manager = await on_own_thread(self._start_manager, self._loaded)
            except Exception as exc:
                raise BackendUnavailable(
                    f"{self.name}: the batching engine could not start: {type(exc).__name__}: {exc}"
                ) from exc
            logger.info("batching engine ready in %.1fs", time.monotonic() - began)
            # Warm-up: the first user must not pay for cache allocation and kernel selection.
            warm = SamplingSettings(do_sample=False, max_new_tokens=2)
            prompt = await asyncio.to_thread(self.encode, [{"role": "user", "content": "warm up"}])
            try:
                async with asyncio.timeout(self._warmup_timeout_s):
                    async for _ in self.stream(prompt, warm):
                        pass
            except TimeoutError:
                raise BackendTimeout(
                    f"{self.name}: the warm-up answer took over {self._warmup_timeout_s:g}s"
                ) from None

    def _start_manager(self, loaded: LoadedModel) -> Any:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from bot.llm.attention import choose
        from bot.llm.sampler import RequestSampler

        on_gpu = loaded.device.startswith("cuda")
        # Greedy at the engine level: transformers takes the argmax of what RequestSampler
        # returns, and creates no processor of its own.
        generation = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False,
            max_new_tokens=256,
            eos_token_id=loaded.eos_token_ids,
            pad_token_id=loaded.pad_token_id,
        )
        # On a GPU the cache is sized from free memory, and CUDA graphs and async batching are
        # chosen by transformers (they need a flash attention path, which `choose` sets when it
        # can; transformers' own switch is off because it may download code). On a CPU
        # transformers would take 60 % of the host's memory: the cache holds instead
        # `CPU_CACHE_TOKENS_PER_REQUEST` tokens for each request admitted (a cache that cannot
        # hold them all holds some back or evicts them, and the last then decode nearly alone at
        # a full step's cost per token: 32 questions of ~400 tokens in 64 pages ran at 0.86 of
        # static batching). Steps run one after another, which RequestSampler's host-side
        # shortcuts rely on, and take up to 2,048 prompt tokens (`cpu_step_tokens`): prefill is
        # compute-bound on a CPU and bigger matrices use it better (32 questions of ~260
        # tokens: 74 tokens/s at 512, 93 at 2,048, no more at 4,096).
        sizing: dict[str, Any] = {}
        if not on_gpu:
            cache_tokens = self._cpu_cache_tokens(loaded)
            sizing = {
                "page_size": _CPU_PAGE_TOKENS,
                "num_blocks": math.ceil(cache_tokens / _CPU_PAGE_TOKENS),
                "safety_margin": _CPU_CACHE_FREE_SHARE,
                "max_memory_percent": _CPU_MEMORY_SHARE,
                "max_batch_tokens": self._cpu_step_tokens,
                "use_async_batching": False,
            }
        config = ContinuousBatchingConfig(auto_switch_to_flash=False, **sizing)
        model: Any = loaded.model
        path = choose(model, loaded.device, self._attention)
        manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=config
        )
        # Read when the generation loop builds its batch processor (start()), not before.
        manager.logit_processor = RequestSampler(branch_free=on_gpu)
        _route_engine_logs()
        if on_gpu:
            manager.warmup()  # capture CUDA graphs now, if transformers chose them
        manager.start()
        varlen, decode = manager.continuous_batching_config.cuda_graph_booleans
        graphs = "on" if varlen or decode else "off"
        logger.info("batching engine: attention %s, CUDA graphs %s", path, graphs)
        return manager

    def _cpu_cache_tokens(self, loaded: LoadedModel) -> int:
        """The CPU cache's size in tokens: every admitted request's share, within half of the
        memory transformers lets the engine use (beyond that it refuses to start)."""
        from transformers.generation.continuous_batching.utils import (
            get_device_and_memory_breakdown,
        )

        wanted = math.ceil(
            self.max_in_flight * CPU_CACHE_TOKENS_PER_REQUEST / (1 - _CPU_CACHE_FREE_SHARE)
        )
        config = loaded.model.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        item = loaded.model.dtype.itemsize
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * item
        per_token += self._cpu_step_tokens * item  # transformers' mask has a column per token
        _, total, reserved, allocated = get_device_and_memory_breakdown()  # reads psutil
        usable = (total - max(reserved, allocated)) * _CPU_MEMORY_SHARE
        affordable = int(usable / 2 / per_token)
        if wanted <= affordable:
            return max(_CPU_CACHE_MIN_TOKENS, wanted)
        tokens = max(_CPU_CACHE_MIN_TOKENS, affordable // _CPU_PAGE_TOKENS * _CPU_PAGE_TOKENS)
        logger.warning(
            "LLM_MAX_QUEUE=%d questions need a KV cache of %s tokens (%.1f GB); the memory "
            "available holds %s tokens, so fewer questions decode at once",
            self.max_in_flight,
            f"{wanted:,}",
            wanted * per_token / 1e9,
            f"{tokens:,}",
        )
        return tokens

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        loaded = self.loaded
        manager = self._manager
        if manager is None:
            raise BackendUnavailable(f"{self.name}: the batching engine is not running")
        if not _accepting(manager):
            await self._revive(manager)
        if self._in_flight >= self.max_in_flight:
            raise BackendBusy(self._in_flight)
        began = time.monotonic()
        self._in_flight += 1
        metrics.QUEUE_DEPTH.set(self._in_flight)
        request_id = next(self._ids)
        registered = added = finished = False
        try:
            ids = prompt.ids
            if ids is None:  # encoded by another backend: encode here, off the loop
                encoded = await asyncio.to_thread(loaded.encode, prompt.messages)
                ids = cast("list[int]", encoded.ids)
            latest = _Latest()
            # Before add_request: the engine thread may produce the first output at once.
            manager.register_result_handler(request_id, latest.put)
            registered = True
            accepted = manager.add_request(
                list(ids),
                request_id=request_id,
                max_new_tokens=sampling.max_new_tokens,
                streaming=True,
                eos_token_id=loaded.eos_token_ids,
                **_request_kwargs(sampling),
            )
            added = accepted is not None
            if not added:
                raise BackendUnavailable(f"{self.name}: the engine is not accepting requests")
            decoder = IncrementalDecoder(loaded.tokenizer)
            first_text_s: float | None = None
            while True:
                result = await latest.get()
                if result.error is not None:
                    finished = True
                    raise BackendFailed(f"{self.name}: engine error: {result.error}")
                tokens: list[int] = result.generated_tokens  # a fresh list per output
                done = bool(result.is_finished())
                text = await self._decode(loaded, decoder, tokens, done)
                if text:
                    if first_text_s is None:
                        first_text_s = time.monotonic() - began
                    yield Delta(text)
                if done:
                    finished = True
                    yield Finished(
                        backend=self.name,
                        prompt_tokens=len(ids),
                        completion_tokens=len(tokens),
                        first_token_s=first_text_s,
                        total_s=time.monotonic() - began,
                    )
                    return
        finally:
            self._in_flight -= 1
            metrics.QUEUE_DEPTH.set(self._in_flight)
            if registered and not finished:
                if added:
                    # The consumer left (channel gone, timeout, shutdown): free the batch slot.
                    manager.cancel_request(request_id)
                _drop_handler_later(manager, request_id)

    @staticmethod
    async def _decode(
        loaded: LoadedModel, decoder: IncrementalDecoder, tokens: list[int], done: bool
    ) -> str:
        """Decode on the loop when the tokenizer is free (microseconds); when a worker holds it
        (encoding a long prompt), decode on a thread rather than block the loop waiting."""

        def step() -> str:
            return decoder.flush(tokens) if done else decoder.push(tokens)

        lock = loaded.tokenizer_lock
        if lock.acquire(blocking=False):
            try:
                return step()
            finally:
                lock.release()

        def locked_step() -> str:
            with lock:
                return step()

        return await asyncio.to_thread(locked_step)

    async def _revive(self, manager: Any) -> None:
        """Restart the generation loop after it died of an error in a step.

        The dead loop has failed its requests already; a new one starts on the same model with
        its batch processor reset (transformers' own restart path: `start()` after `stop()`).
        """
        async with self._revive_lock:
            if self._manager is not manager:
                raise BackendUnavailable(f"{self.name}: the batching engine is closed")
            if _accepting(manager):
                return  # another request revived it while this one waited
            error = manager.background_thread_status.fatal_error
            # The dying thread is only finishing its clean-up; join() forgets it once it ended.
            await asyncio.to_thread(manager.join, time.perf_counter(), 10.0)
            if manager.is_running():
                raise BackendUnavailable(f"{self.name}: the batching engine does not stop")
            logger.warning(
                "%s: restarting the batching engine, which stopped after: %s: %s",
                self.name,
                type(error).__name__,
                error,
            )
            manager.start()

    async def aclose(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            await asyncio.to_thread(manager.stop, block=True, timeout=30)
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            device = loaded.device
            del loaded
            free_memory(device)
