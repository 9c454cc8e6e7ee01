"""doctor: the GPU, the local model (loaded through the bot's own path) and whether any
backend can answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.commands.doctor.checks import (
    NETWORK_TIMEOUT_S,
    Check,
    Status,
    fail,
    in_thread,
    ok,
    reason,
    skip,
    warn,
)
from bot.commands.doctor.openai_check import check_model_server
from bot.config import Settings
from bot.sampling import SamplingSettings

if TYPE_CHECKING:
    from bot.llm.base import LLM
    from bot.llm.loader import LoadedModel


GPU_TIMEOUT_S = 60.0  # importing torch and initialising CUDA can take a while on a cold host
MODEL_TIMEOUT_S = 600.0  # loading from the disk or the cache, onto the device
DOWNLOAD_TIMEOUT_S = 3 * 3600.0  # --download: a multi-GB download, then the load


def _local_model_unused(settings: Settings) -> str | None:
    if settings.llm_base_url:
        return "LLM_BASE_URL serves the model"
    if not settings.local_model_enabled:
        return "LLM_MODEL=none"
    return None


async def check_gpu(settings: Settings) -> list[Check]:
    unused = _local_model_unused(settings)
    if unused is not None:
        return skip("gpu", f"not used: {unused}")
    if settings.llm_device == "cpu":
        return skip("gpu", "not used: LLM_DEVICE=cpu")
    try:
        return [await in_thread(lambda: _inspect_gpu(settings.llm_device), GPU_TIMEOUT_S)]
    except TimeoutError:
        return fail("gpu", f"torch did not initialise CUDA within {GPU_TIMEOUT_S:.0f}s")


def _inspect_gpu(device: str) -> Check:
    import torch

    build = f"torch {torch.__version__}" + (
        f", CUDA {torch.version.cuda}" if torch.version.cuda else ", a CPU-only build"
    )
    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            return Check("gpu", Status.FAIL, f"LLM_DEVICE={device} but no CUDA device ({build})")
        return Check("gpu", Status.WARN, f"no CUDA device ({build}): the model runs on the CPU")
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        return Check("gpu", Status.FAIL, f"LLM_DEVICE={device} but only {count} CUDA device(s)")
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return Check(
        "gpu",
        Status.OK,
        f"{props.name} (cuda:{index} of {count}, compute {props.major}.{props.minor}), "
        f"{_gib(free)} free of {_gib(total)}; {build}",
    )


async def check_model(
    settings: Settings, *, download: bool = False, after: Awaitable[object] | None = None
) -> list[Check]:
    if settings.llm_base_url:
        return await check_model_server(settings)
    if not settings.local_model_enabled:
        return skip("model", "LLM_MODEL=none: no local model")
    if after is not None:
        await after  # the GPU check imports torch first: two threads importing it may clash
    located = await in_thread(lambda: _locate(settings.llm_model, download), NETWORK_TIMEOUT_S)
    if isinstance(located, Check):
        return [located]
    return [await _load(settings, located, DOWNLOAD_TIMEOUT_S if download else MODEL_TIMEOUT_S)]


def _locate(model: str, download: bool) -> str | Check:
    """What to load: a directory, a Hub id (only with --download), or why there is nothing."""
    if Path(model).expanduser().is_dir():
        return model
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # lazy export

    try:
        validate_repo_id(model)
    except HFValidationError:
        return Check("model", Status.FAIL, f"LLM_MODEL={model}: no such directory")
    if download:
        return model  # the bot's own path: downloaded into the cache once, then loaded
    cached = _cached_snapshot(model)
    if cached is not None:
        return cached
    where = f"not a directory here and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return Check("model", Status.FAIL, f"{model}: {where}, and HF_HUB_OFFLINE is set")
    # Downloadable now? Asked the way the bot asks (bounded calls, the same failure line): a hub
    # that cannot be reached leaves the bot without this model, which is a FAIL, not a warning.
    from bot.llm import hub

    hub.bound_hub_calls()
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model)
    except Exception as exc:
        return Check("model", Status.FAIL, hub.describe_failure(model, exc))
    return Check(
        "model",
        Status.WARN,
        f"{model}: {where}; the bot downloads it at its first start, "
        "or run `supportbot doctor --download` to fetch and load it now",
    )


def _cached_snapshot(repo_id: str) -> str | None:
    """The cached snapshot's directory: loading a directory cannot start a download."""
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):  # not cached (LocalEntryNotFoundError), unreadable, …
        return str(snapshot_download(repo_id=repo_id, local_files_only=True))
    return None


async def _load(settings: Settings, source: str, timeout_s: float) -> Check:
    """Load through the bot's own path (build_local), then generate one token."""
    from bot.commands.runtime import build_local

    # The one-at-a-time engine: loading is what is checked, without the batching warm-up.
    llm = build_local(settings.model_copy(update={"llm_model": source}), engine="simple")
    began = time.monotonic()
    try:
        await asyncio.wait_for(llm.start(), timeout_s)
    except TimeoutError:
        detail = f"{settings.llm_model} did not load within {timeout_s:.0f}s"
        return Check("model", Status.FAIL, detail, abandoned=True)
    except Exception as exc:
        await llm.aclose()
        return Check("model", Status.FAIL, reason(exc))
    loaded_s = time.monotonic() - began
    try:
        first_s = await asyncio.wait_for(_first_token(llm), MODEL_TIMEOUT_S)
        facts = _describe_loaded(llm.loaded)
    except TimeoutError:
        detail = f"{settings.llm_model} loaded but produced no token in {MODEL_TIMEOUT_S:.0f}s"
        return Check("model", Status.FAIL, detail, abandoned=True)
    except Exception as exc:
        await llm.aclose()
        detail = f"{settings.llm_model} loaded but does not generate: {reason(exc)}"
        return Check("model", Status.FAIL, detail)
    await llm.aclose()
    return Check(
        "model",
        Status.OK,
        f"{settings.llm_model} {facts}; loaded in {loaded_s:.1f}s, first token in {first_s:.2f}s",
    )


async def _first_token(llm: LLM) -> float:
    began = time.monotonic()
    greedy = SamplingSettings(do_sample=False, max_new_tokens=1)
    prompt = await asyncio.to_thread(llm.encode, [{"role": "user", "content": "ping"}])
    async for _ in llm.stream(prompt, greedy):
        pass
    return time.monotonic() - began


def _describe_loaded(loaded: LoadedModel) -> str:
    """Device, dtype, size: "on cuda as bfloat16, 2.41B parameters, 4.5 GiB of weights"."""
    model: Any = loaded.model
    device = loaded.device
    params = sum(int(p.numel()) for p in model.parameters())
    facts = (
        f"on {device} as {str(model.dtype).removeprefix('torch.')}, "
        f"{_count(params)} parameters, {_gib(model.get_memory_footprint())} of weights"
    )
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        facts += f", {_gib(free)} left free on the GPU"
    return facts


def _gib(size: float) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for scale, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


async def check_backend(
    settings: Settings, model: Awaitable[list[Check]], gpt: Awaitable[list[Check]]
) -> list[Check]:
    """At least one backend must be able to answer, or the bot only apologises."""
    primary = f"server:{settings.llm_model}" if settings.llm_base_url else "the local model"
    backends = ((primary, await model), (f"openai:{settings.openai_model}", await gpt))
    candidates = [
        (label, check.status)
        for label, checks in backends
        for check in checks
        if check.status is not Status.SKIP
    ]
    if not candidates:
        return fail("backend", "no backend can answer: set LLM_MODEL or OPENAI_API_KEY")
    working = [label for label, status in candidates if status is Status.OK]
    others = [label for label, status in candidates if status is not Status.OK]
    if working:
        detail = "answers with " + ", then ".join(working)
        return ok("backend", detail + (f" ({', '.join(others)} not usable)" if others else ""))
    if any(status is Status.WARN for _, status in candidates):
        return warn("backend", "no backend checked yet: see the warnings above")
    return fail("backend", "no backend can answer: each one configured failed above")
