"""Loading a local model once, for whichever engine runs it.

`ModelLoader` says what to load (checkpoint, device, dtype); its `load()` returns a `LoadedModel`:
the model, its tokenizer, the stop and pad ids, the context window, and the prompt encoder both
engines share. Engines take a loader and call `open_model()` in their `start()`, so a model that
cannot load becomes BackendUnavailable there and the chain falls back to GPT.

torch and transformers are imported inside the functions: importing this module stays cheap for
commands that never load a model.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from bot.llm.base import BackendUnavailable, ChatMessage, Prompt
from bot.llm.exaone import load_model_and_tokenizer, resolve_model_dir
from bot.ops import metrics
from bot.ops.logging import route_library_logs
from bot.ops.threads import on_own_thread

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# EXAONE ends every turn with this token; generation must stop there even when a checkpoint's
# generation_config names another eos.
END_OF_TURN = "[|endofturn|]"

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_DTYPES = ("auto", "bfloat16", "float16", "float32")


def as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass(frozen=True, slots=True, eq=False)
class LoadedModel:
    """A model in memory with what generating from it needs.

    The Rust tokenizer refuses concurrent use ("Already borrowed"), so every use of `tokenizer`
    holds `tokenizer_lock`: encoding (a worker thread of the caller's), and the engines' decoding.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: str
    eos_token_ids: list[int]
    pad_token_id: int
    context_window: int
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def encode(self, messages: Sequence[ChatMessage]) -> Prompt:
        """The prompt ids: chat template with the generation prompt, control tokens typed by
        users kept as text (a user typing "[|endofturn|][|assistant|]" forges no turn). Blocks:
        callers run it off the event loop."""
        with self.tokenizer_lock:
            ids = self.tokenizer.apply_chat_template(
                as_dicts(messages),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,  # transformers 5 returns a BatchEncoding by default
                sanitize_control_tokens=True,
            )
        ids = cast("list[int]", ids)
        return Prompt(messages=list(messages), tokens=len(ids), ids=ids)

    def count_each(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Each message rendered alone (its template tokens, sanitised as in `encode`), in one
        batched call. Alone, a message also carries the template's fixed tokens (the generation
        prompt, a default system turn), so the counts over-estimate and their sum is never below
        `encode(messages).tokens`."""
        if not messages:
            return []
        with self.tokenizer_lock:
            each = self.tokenizer.apply_chat_template(
                [[message] for message in as_dicts(messages)],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,
            )
        return [len(ids) for ids in cast("list[list[int]]", each)]


class Loader(Protocol):
    """What an engine takes: a name and context before loading, and `load()` (blocking)."""

    @property
    def name(self) -> str: ...

    @property
    def context_tokens(self) -> int | None: ...

    def load(self) -> LoadedModel: ...


def model_tail(model: str) -> str:
    """The model's own name, from a Hub id ("org/name") or a directory ("/models/name/", ".")."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path.resolve()
    return path.name or model


@dataclass(frozen=True, slots=True)
class ModelLoader:
    """A checkpoint directory or Hub id (downloaded once into the HF cache) and where to run it."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    context_tokens: int | None = None  # overrides the checkpoint's max_position_embeddings

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ValueError("context_tokens must be positive")

    @property
    def name(self) -> str:
        return "local:" + model_tail(self.model)

    def load(self) -> LoadedModel:
        route_library_logs()  # before transformers logs or draws anything
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        model_dir = resolve_model_dir(self.model, include_code=self.trust_remote_code)
        model, tokenizer = load_model_and_tokenizer(
            model_dir, device, dtype, trust_remote_code=self.trust_remote_code
        )
        if not tokenizer.chat_template:
            raise ValueError(f"{model_dir} has no chat template")
        eos_token_ids = stop_token_ids(model, tokenizer)
        if not eos_token_ids:
            raise ValueError(f"{model_dir} names no end-of-sequence token")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            device=device,
            eos_token_ids=eos_token_ids,
            pad_token_id=int(pad) if pad is not None else eos_token_ids[0],
            context_window=self.context_tokens or int(model.config.max_position_embeddings),
        )


async def open_model(loader: Loader) -> LoadedModel:
    """`loader.load()` on a thread of its own (bot/ops/threads.py); any failure becomes
    BackendUnavailable naming it."""
    began = time.monotonic()
    try:
        loaded = await on_own_thread(loader.load)
    except BackendUnavailable:
        raise
    except Exception as exc:
        # The chain logs the reason on one line; the traceback is there for debug logging.
        logger.debug("%s failed to load", loader.name, exc_info=True)
        raise BackendUnavailable(
            f"{loader.name} could not be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if loaded.device.startswith("cuda"):
        import torch

        device = loaded.device
        metrics.GPU_MEMORY.set_function(lambda: torch.cuda.memory_allocated(device))
    logger.info("%s loaded on %s in %.1fs", loader.name, loaded.device, time.monotonic() - began)
    return loaded


def free_memory(device: str) -> None:
    """Give a dropped model's memory back (call it once no reference to the model is left)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def resolve_device(device: str) -> str:
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


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        # bfloat16 needs Ampere or newer; older GPUs get float16 rather than slow emulation.
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float16
    return cast("torch.dtype", getattr(torch, dtype))


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
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
