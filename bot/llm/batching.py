"""The continuous-batching engine: every channel's question decoded together on one resident model.

transformers' continuous batching (`model.init_continuous_batching`) runs a generation thread
with a paged KV cache; requests join and leave the running batch at every step, so the tenth
channel does not wait for nine whole answers. Sampling is per request
(`ContinuousBatchingConfig(per_request_processors=True)`). `do_sample` is global there, so the
engine always samples and expresses greedy decoding as `top_k=1`, which leaves only the argmax
token (tests check it equals greedy `generate` token for token).

Tokens arrive on the event loop through `register_result_handler`; text is decoded incrementally
per request. A bounded number of requests may be in the engine at once: past it, the request
raises BackendBusy, so the fallback chain sends it to GPT or the user is told how many are ahead.

An error in a generation step (a CUDA out-of-memory, say) fails the requests in the batch and ends
transformers' generation loop for good; the next request restarts the loop on the same model, so
one bad step does not take the local model away until the process restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from bot.llm.base import (
    BackendBusy,
    BackendFailed,
    BackendUnavailable,
    ChatMessage,
    Delta,
    Finished,
    StreamEvent,
)
from bot.llm.local import LocalLLM
from bot.ops import metrics
from bot.sampling import SamplingSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Sampling values the engine is created with. Each processor exists only if its creation value
# is not a no-op (temperature 1.0, top_p 1.0), and only existing processors take per-request
# values; requests always pass their own.
_CREATION_SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}
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


@dataclass
class _Request:
    """One request's results, fed by the engine thread through the event loop."""

    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


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


class BatchingLocalLLM(LocalLLM):
    """LocalLLM with the continuous-batching engine instead of one generation at a time."""

    def __init__(self, model: str, *, max_in_flight: int = 64, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._manager: Any = None
        self._in_flight = 0
        self._revive_lock = asyncio.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        await super().start()
        if self._manager is None:
            loop = asyncio.get_running_loop()
            began = time.monotonic()
            try:
                self._manager = await loop.run_in_executor(self._executor, self._start_manager)
            except Exception as exc:
                raise BackendUnavailable(
                    f"{self.name}: the batching engine could not start: {type(exc).__name__}: {exc}"
                ) from exc
            logger.info("batching engine ready in %.1fs", time.monotonic() - began)
            # Warm-up: the first user must not pay for cache allocation and kernel selection.
            warm = SamplingSettings(do_sample=False, max_new_tokens=2)
            async for _ in self.stream([{"role": "user", "content": "warm up"}], warm):
                pass

    def _start_manager(self) -> Any:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        loaded = self._require_loaded()
        on_gpu = loaded.device.startswith("cuda")
        generation = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=True,
            max_new_tokens=256,
            eos_token_id=loaded.eos_token_ids,
            pad_token_id=loaded.pad_token_id,
            **_CREATION_SAMPLING,
        )
        # On a GPU the cache is sized from free memory and CUDA graphs are chosen automatically;
        # on a CPU a small fixed cache keeps start-up quick and RAM use modest.
        sizing: dict[str, Any] = {} if on_gpu else {"num_blocks": 64, "max_batch_tokens": 512}
        config = ContinuousBatchingConfig(per_request_processors=True, **sizing)
        model: Any = loaded.model
        manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=config
        )
        _route_engine_logs()
        if on_gpu:
            manager.warmup()  # capture CUDA graphs now, not during the first answer
        manager.start()
        return manager

    def _request_kwargs(self, sampling: SamplingSettings) -> dict[str, Any]:
        if not sampling.do_sample:
            # Greedy: only the argmax token survives top-k=1, whatever the temperature.
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {
            "temperature": float(sampling.temperature),
            "top_k": int(sampling.top_k),
            "top_p": float(sampling.top_p),
        }

    async def stream(
        self, messages: Sequence[ChatMessage], sampling: SamplingSettings
    ) -> AsyncGenerator[StreamEvent, None]:
        loaded = self._require_loaded()
        manager = self._manager
        if manager is None:
            raise BackendUnavailable(f"{self.name}: the batching engine is not running")
        if not _accepting(manager):
            await self._revive(manager)
        if self._in_flight >= self.max_in_flight:
            raise BackendBusy(self._in_flight)
        began = time.monotonic()
        prompt_ids = self.encode(messages)
        request = _Request()
        self._in_flight += 1
        metrics.QUEUE_DEPTH.set(self._in_flight)
        request_id: str | None = None
        finished = False
        try:
            request_id = manager.add_request(
                prompt_ids,
                max_new_tokens=sampling.max_new_tokens,
                streaming=True,
                eos_token_id=loaded.eos_token_ids,
                **self._request_kwargs(sampling),
            )
            if request_id is None:
                raise BackendUnavailable(f"{self.name}: the engine is not accepting requests")
            manager.register_result_handler(request_id, request.queue.put_nowait)
            decoder = IncrementalDecoder(loaded.tokenizer)
            first_text_s: float | None = None
            while True:
                result = await request.queue.get()
                tokens = list(result.generated_tokens)
                if result.error is not None:
                    finished = True
                    raise BackendFailed(f"{self.name}: engine error: {result.error}")
                done = result.is_finished()
                with self._tokenizer_lock:
                    text = decoder.flush(tokens) if done else decoder.push(tokens)
                if text:
                    if first_text_s is None:
                        first_text_s = time.monotonic() - began
                    yield Delta(text)
                if done:
                    finished = True
                    yield Finished(
                        backend=self.name,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=len(tokens),
                        first_token_s=first_text_s,
                        total_s=time.monotonic() - began,
                    )
                    return
        finally:
            self._in_flight -= 1
            metrics.QUEUE_DEPTH.set(self._in_flight)
            if request_id is not None and not finished:
                # The consumer left (channel gone, timeout, shutdown): free the batch slot.
                manager.cancel_request(request_id)
                _drop_handler_later(manager, request_id)

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
        await super().aclose()
