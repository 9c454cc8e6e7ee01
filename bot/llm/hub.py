"""The Hugging Face Hub, bounded and visible: every call times out, a download shows progress.

huggingface_hub's shared HTTP client has no timeout, and some of its calls (`repo_info`, which
`snapshot_download` makes first) pass `timeout=None` explicitly: a hub that accepts the connection
and never answers hangs the bot forever. `bound_hub_calls()` adds a request hook to that client
which fills every missing timeout with `HF_HUB_DOWNLOAD_TIMEOUT` (the hub's own variable, 10 s by
default). It bounds each wait for bytes, not a whole download: a 5 GB file on a slow link still
arrives.

`download()` is `snapshot_download` with those bounds, its progress logged through our logging
(size, share and rate, every few seconds) instead of tqdm bars, and its failure turned into one
line that says what to do.

huggingface_hub is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bot.llm.base import BackendUnavailable

logger = logging.getLogger(__name__)

# One progress line at most this often, across every bar of a download.
PROGRESS_EVERY_S = 5.0
WHAT_TO_DO = (
    "point LLM_MODEL at a checkpoint directory, or set OPENAI_API_KEY to answer with GPT "
    "(LLM_MODEL=none for GPT alone)"
)

_bounded = False
_bounded_lock = threading.Lock()


def hub_timeout_s() -> float:
    """HF_HUB_DOWNLOAD_TIMEOUT as huggingface_hub reads it (10 s unless set)."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def bound_hub_calls() -> None:
    """Make every request of huggingface_hub's shared client give up after `hub_timeout_s()`
    without a byte (connecting, sending, waiting). Idempotent."""
    global _bounded
    with _bounded_lock:
        if _bounded:
            return
        from huggingface_hub.utils import _http

        timeout_s = hub_timeout_s()

        def fill_timeouts(request: Any) -> None:
            # The client put the call's timeouts here; None means "wait forever": not for us.
            timeouts = dict(request.extensions.get("timeout") or {})
            for phase in ("connect", "read", "write", "pool"):
                if timeouts.get(phase) is None:
                    timeouts[phase] = timeout_s
            request.extensions["timeout"] = timeouts

        def factory() -> Any:
            client = _http.default_client_factory()
            hooks = client.event_hooks
            hooks["request"] = [*hooks.get("request", []), fill_timeouts]
            client.event_hooks = hooks
            return client

        _http.set_client_factory(factory)
        _bounded = True


def cached_snapshot(repo_id: str, allow_patterns: Sequence[str]) -> Path | None:
    """The repository's snapshot in the local cache, or None when it has not been downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id=repo_id, allow_patterns=list(allow_patterns), local_files_only=True
            )
        )
    except Exception:  # not cached (LocalEntryNotFoundError), or an invalid id
        return None


def download(repo_id: str, allow_patterns: Sequence[str]) -> Path:
    """The repository's snapshot: from the cache when it is there and the hub agrees, else
    downloaded with progress logged. Raises BackendUnavailable with one line on failure."""
    from huggingface_hub import constants, snapshot_download

    bound_hub_calls()
    cached = cached_snapshot(repo_id, allow_patterns)
    if cached is None and not constants.HF_HUB_OFFLINE:
        logger.info(
            "downloading %s from %s into %s (once; later starts read the cache)",
            repo_id,
            constants.ENDPOINT,
            constants.HF_HUB_CACHE,
        )
    began = time.monotonic()
    try:
        snapshot = snapshot_download(
            repo_id=repo_id,
            allow_patterns=list(allow_patterns),
            tqdm_class=progress_class(repo_id),
        )
    except Exception as exc:
        raise BackendUnavailable(describe_failure(repo_id, exc)) from exc
    if cached is None:
        logger.info("downloaded %s in %.0fs", repo_id, time.monotonic() - began)
    return Path(snapshot)


def describe_failure(repo_id: str, exc: BaseException) -> str:
    """One line: what failed, why, and what to do."""
    from huggingface_hub import constants

    chain = [exc, *_causes(exc)]
    names = {type(e).__name__ for e in chain}
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache"
    elif any("Timeout" in name for name in names):
        why = (
            f"the hub at {constants.ENDPOINT} did not answer within {hub_timeout_s():g}s "
            "(HF_HUB_DOWNLOAD_TIMEOUT)"
        )
    elif names & {"ConnectError", "ConnectionError", "ProxyError"}:
        why = f"the hub at {constants.ENDPOINT} cannot be reached"
    elif names & {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
        why = f"the hub has no such repository, or it needs a token ({type(exc).__name__})"
    else:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return f"local model {repo_id!r} could not be downloaded: {why}; {WHAT_TO_DO}"


def _causes(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current = exc.__cause__ or exc.__context__
    while current is not None and len(found) < 8:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def progress_class(repo_id: str) -> type[Any]:
    """A tqdm class for `snapshot_download` whose bars draw nothing: byte counts are logged,
    one line every PROGRESS_EVERY_S at most, through the bot's logging."""
    last = [0.0]
    lock = threading.Lock()

    class LoggedProgress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            info = self.format_dict
            if info.get("unit") != "B" or not info.get("n"):
                return True
            now = time.monotonic()
            with lock:
                if now - last[0] < PROGRESS_EVERY_S:
                    return True
                last[0] = now
            done, total, rate = info["n"], info.get("total"), info.get("rate")
            size = tqdm.format_sizeof(done, "B", 1024)
            if total:
                size += f" of {tqdm.format_sizeof(total, 'B', 1024)} ({100 * done / total:.0f}%)"
            speed = f", {tqdm.format_sizeof(rate, 'B/s', 1024)}" if rate else ""
            logger.info("downloading %s: %s%s", repo_id, size, speed)
            return True

        def close(self) -> None:
            file = self.fp
            super().close()
            if file is not None and not file.closed:
                file.close()

    return LoggedProgress
