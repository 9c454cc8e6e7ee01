"""`supportbot doctor`: check the configuration and every dependency, one line per check.

Each line is `STATUS  name: detail`, the status in a column six characters wide:

    ok    redis: embedded redis-server 6.2.14 answers (SET/GET/DEL); DATA_DIR data is writable
    warn  gpu: no CUDA device (torch 2.13.0+cpu, a CPU-only build): the model runs on the CPU
    FAIL  openai: OPENAI_API_KEY rejected (HTTP 401)
    skip  discord: DISCORD_TOKEN not set

`ok` works, `warn` works but deserves a look, `skip` is not configured, `FAIL` is broken. The exit
status is 0 when nothing failed, 1 when a check failed, and 2 when the configuration itself is
invalid (then that is the only line). A summary line ends the output.

Checks run concurrently and print in a fixed order as soon as each one's turn comes. Every
network call has a timeout, blocking work runs on daemon threads with one, and every line passes
through the log redaction, so no secret value is ever printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ReadOnlyError, RedisError, ResponseError

from bot.config import ConfigError, Settings, load_settings
from bot.ops.logging import RedactingFilter, setup_logging
from bot.ops.redis_server import RedisServer, RedisServerError
from bot.sampling import SamplingSettings

if TYPE_CHECKING:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.llm.base import LLM

# openai, slack_sdk and discord.py are imported when the checks start (see _import_clients), so
# that an invalid setting is reported at once.

NETWORK_TIMEOUT_S = 10.0
GPU_TIMEOUT_S = 60.0  # importing torch and initialising CUDA can take a while on a cold host
MODEL_TIMEOUT_S = 600.0  # loading from the disk or the cache, onto the device
DOWNLOAD_TIMEOUT_S = 3 * 3600.0  # --download: a multi-GB download, then the load
EMBEDDED_REDIS_TIMEOUT_S = 15.0
_MAX_DETAIL = 300
# vLLM and similar servers take any bearer token when run without one, but the SDK wants one.
_PLACEHOLDER_KEY = "EMPTY"
# Discord application flags: the Message Content intent, approved or (unverified bots) enabled.
# https://discord.com/developers/docs/resources/application#application-object-application-flags
_MESSAGE_CONTENT_FLAGS = (1 << 18) | (1 << 19)

T = TypeVar("T")


class Status(Enum):
    OK = "ok"
    WARN = "warn"
    SKIP = "skip"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    # The check gave up on work still running on a non-daemon thread (a model load that timed
    # out); the command must then exit without waiting for it.
    abandoned: bool = False

    @property
    def line(self) -> str:
        return f"{self.status.value:<6}{self.name}: {self.detail}"


Report = Callable[[Check], None]


def exit_status(checks: Iterable[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def summary(checks: list[Check]) -> str:
    counts = {s: sum(1 for c in checks if c.status is s) for s in Status}
    parts = ", ".join(f"{counts[s]} {s.value}" for s in Status)
    return f"doctor: {parts}; exit {exit_status(checks)}"


# -- the command ---------------------------------------------------------------------------------


def run_doctor(*, download: bool = False, verbose: bool = False, out: TextIO | None = None) -> int:
    """`supportbot doctor`: print one line per check; the exit status for scripts."""
    out = out or sys.stdout
    try:
        settings = load_settings()
        if settings.discord_shard_ids is not None:
            from bot.platforms.discord import shard_config

            shard_config(settings)  # `supportbot discord` refuses these too, before connecting
    except ConfigError as exc:  # never carries a secret's value
        print(Check("config", Status.FAIL, str(exc)).line, file=out, flush=True)
        return 2
    secrets = settings.secret_values()
    # The bot's own logs only with --verbose: each line below already says what went wrong.
    setup_logging(settings.log_format, secrets, level=logging.INFO if verbose else logging.CRITICAL)
    redact = RedactingFilter(secrets).redact

    def report(check: Check) -> None:
        print(redact(check.line), file=out, flush=True)

    config = Check("config", Status.OK, _config_detail())
    report(config)
    checks = [config, *asyncio.run(diagnose(settings, download=download, report=report))]
    status = exit_status(checks)
    print(summary(checks), file=out, flush=True)
    if any(c.abandoned for c in checks):
        # A timed-out model load still holds a worker thread that interpreter exit would join.
        sys.stderr.flush()
        os._exit(status)
    return status


def _config_detail() -> str:
    env_file = Path(".env")
    if env_file.is_file():
        return f"valid (environment and {env_file.resolve()})"
    return "valid (environment; no .env in this directory)"


def mask_url(url: str) -> str:
    """The URL with its password (in the authority or a `password=` query) shown as ****."""
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        password = parts.password
    except ValueError:
        return "(a URL that cannot be parsed)"
    in_query = any(k.lower() == "password" for k, _ in pairs)
    if password is None and not in_query:
        return url  # as written: urlunsplit would also drop the "//" of "unix:///path"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:****@{netloc.rpartition('@')[2]}"
    masked = [(k, "****" if k.lower() == "password" else v) for k, v in pairs]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(masked, safe="/*")))


async def diagnose(
    settings: Settings, *, download: bool = False, report: Report | None = None
) -> list[Check]:
    """Every check after the configuration's, concurrently; reported and returned in order."""
    _import_clients()
    gpu = _start("gpu", check_gpu(settings))
    model = _start("model", check_model(settings, download=download, after=gpu))
    gpt = _start("openai", check_openai(settings))
    ordered = [
        _start("redis", check_redis(settings)),
        gpu,
        model,
        gpt,
        _start("backend", check_backend(settings, model, gpt)),
        _start("slack", check_slack(settings)),
        _start("discord", check_discord(settings)),
    ]
    checks: list[Check] = []
    for task in ordered:
        for check in await task:
            if report is not None:
                report(check)
            checks.append(check)
    return checks


def _import_clients() -> None:
    """Import the network clients on this thread before the model check imports torch and
    transformers on another: two threads importing large packages at once can trip up."""
    import discord  # noqa: F401
    import openai  # noqa: F401

    import bot.platforms.slack  # noqa: F401


def _start(name: str, check: Awaitable[list[Check]]) -> asyncio.Task[list[Check]]:
    return asyncio.ensure_future(_guarded(name, check))


async def _guarded(name: str, check: Awaitable[list[Check]]) -> list[Check]:
    try:
        return await check
    except Exception as exc:  # one check's unforeseen failure must not hide the others
        return [Check(name, Status.FAIL, f"the check itself failed: {_reason(exc)}")]


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


async def _in_thread(work: Callable[[], T], timeout_s: float) -> T:
    """`work()` on a daemon thread, bounded by `timeout_s`.

    Unlike asyncio.to_thread's pool, a call that never returns (a hung driver, a dead mount) can
    neither hang doctor nor hold up its exit.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if done.done():  # the caller has timed out already
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast(T, value))

    def run() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = work()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="doctor-check", daemon=True).start()
    return await asyncio.wait_for(done, timeout_s)


def _ok(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.OK, detail)]


def _fail(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.FAIL, detail)]


def _skip(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.SKIP, detail)]


def _warn(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.WARN, detail)]


# -- Redis ---------------------------------------------------------------------------------------


async def check_redis(settings: Settings) -> list[Check]:
    if settings.redis_url is None:
        return await _check_embedded_redis(settings.data_dir)
    url = settings.redis_url.get_secret_value()
    shown = mask_url(url)
    try:
        version = await _probe_redis(url)
    except AuthenticationError:
        return _fail("redis", f"{shown}: authentication failed (the password in REDIS_URL?)")
    except ReadOnlyError:
        return _fail("redis", f"{shown} is read-only (a replica?): the bot needs to write")
    except (RedisError, OSError, TimeoutError, ValueError) as exc:
        return _fail("redis", f"cannot use {shown}: {_reason(exc)}")
    return _ok("redis", f"{shown} answers (SET/GET/DEL; Redis {version})")


async def _check_embedded_redis(data_dir: Path) -> list[Check]:
    # Without persistence: a bot already running over DATA_DIR keeps sole use of its files.
    server = RedisServer(data_dir, persist=False)
    try:
        await _in_thread(server.start, EMBEDDED_REDIS_TIMEOUT_S)  # creates DATA_DIR, as the bot
    except RedisServerError as exc:
        return _fail("redis", f"embedded redis-server: {exc}")
    except TimeoutError:
        return _fail("redis", "embedded redis-server did not start in time; or set REDIS_URL")
    try:
        await _in_thread(lambda: _probe_writable(data_dir), NETWORK_TIMEOUT_S)
        version = await _probe_redis(server.url)
    except OSError as exc:  # from the DATA_DIR probe: redis-py wraps its own in RedisError
        return _fail("redis", f"DATA_DIR {data_dir} is not writable ({exc.strerror or exc})")
    except (RedisError, TimeoutError) as exc:
        return _fail("redis", f"embedded redis-server does not answer: {_reason(exc)}")
    finally:
        await _in_thread(server.stop, EMBEDDED_REDIS_TIMEOUT_S)
    return _ok(
        "redis",
        f"embedded redis-server {version} answers (SET/GET/DEL); DATA_DIR {data_dir} is writable",
    )


async def _probe_redis(url: str) -> str:
    """SET, GET and DEL a key of our own; the server's version."""
    client = Redis.from_url(
        url, socket_connect_timeout=NETWORK_TIMEOUT_S / 2, socket_timeout=NETWORK_TIMEOUT_S
    )
    try:
        return await asyncio.wait_for(_round_trip(client), NETWORK_TIMEOUT_S)
    finally:
        await client.aclose()


async def _round_trip(client: Redis) -> str:
    key = f"supportbot:doctor:{uuid.uuid4().hex}"
    value = uuid.uuid4().hex
    await client.set(key, value, ex=60)  # expires by itself should DEL never run
    read = await client.get(key)
    await client.delete(key)
    if read != value.encode():
        raise RedisError("a value written was not read back")
    try:
        info = await client.info("server")
    except ResponseError:  # managed services may disable INFO
        return "(version not shown)"
    return str(info.get("redis_version", "(version not shown)"))


def _probe_writable(directory: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
        pass


# -- GPU and the local model ---------------------------------------------------------------------


def _local_model_unused(settings: Settings) -> str | None:
    if settings.llm_base_url:
        return "LLM_BASE_URL serves the model"
    if not settings.local_model_enabled:
        return "LLM_MODEL=none"
    return None


async def check_gpu(settings: Settings) -> list[Check]:
    unused = _local_model_unused(settings)
    if unused is not None:
        return _skip("gpu", f"not used: {unused}")
    if settings.llm_device == "cpu":
        return _skip("gpu", "not used: LLM_DEVICE=cpu")
    try:
        return [await _in_thread(lambda: _inspect_gpu(settings.llm_device), GPU_TIMEOUT_S)]
    except TimeoutError:
        return _fail("gpu", f"torch did not initialise CUDA within {GPU_TIMEOUT_S:.0f}s")


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
        return await _check_model_server(settings)
    if not settings.local_model_enabled:
        return _skip("model", "LLM_MODEL=none: no local model")
    if after is not None:
        await after  # the GPU check imports torch first: two threads importing it may clash
    located = await _in_thread(lambda: _locate(settings.llm_model, download), NETWORK_TIMEOUT_S)
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
    from bot.app import build_local

    # The one-at-a-time engine: loading is what is checked, without the batching warm-up.
    llm = build_local(settings.model_copy(update={"llm_model": source, "llm_engine": "simple"}))
    began = time.monotonic()
    try:
        await asyncio.wait_for(llm.start(), timeout_s)
    except TimeoutError:
        detail = f"{settings.llm_model} did not load within {timeout_s:.0f}s"
        return Check("model", Status.FAIL, detail, abandoned=True)
    except Exception as exc:
        await llm.aclose()
        return Check("model", Status.FAIL, _reason(exc))
    loaded_s = time.monotonic() - began
    try:
        first_s = await asyncio.wait_for(_first_token(llm), MODEL_TIMEOUT_S)
        facts = _describe_loaded(llm)
    except TimeoutError:
        detail = f"{settings.llm_model} loaded but produced no token in {MODEL_TIMEOUT_S:.0f}s"
        return Check("model", Status.FAIL, detail, abandoned=True)
    except Exception as exc:
        await llm.aclose()
        detail = f"{settings.llm_model} loaded but does not generate: {_reason(exc)}"
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
    async for _ in llm.stream([{"role": "user", "content": "ping"}], greedy):
        pass
    return time.monotonic() - began


def _describe_loaded(llm: LLM) -> str:
    """Device, dtype, size: "on cuda as bfloat16, 2.41B parameters, 4.5 GiB of weights"."""
    # LocalLLM keeps its loaded model private; doctor only reads it, and copes if it moves.
    loaded: Any = getattr(llm, "_loaded", None)
    model: Any = getattr(loaded, "model", None)
    if model is None:
        return "loaded"
    device = str(getattr(loaded, "device", model.device))
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


# -- OpenAI-compatible servers -------------------------------------------------------------------


def _api_failure(exc: Exception, key_name: str, where: str) -> tuple[Status, str]:
    """The status and the line for an OpenAI SDK error; never the server's text, which may
    echo the key."""
    import openai

    if isinstance(exc, openai.AuthenticationError):
        return Status.FAIL, f"{key_name} rejected (HTTP 401)"
    if isinstance(exc, openai.PermissionDeniedError):
        return Status.FAIL, f"{key_name} may not list models (HTTP 403)"
    if isinstance(exc, openai.NotFoundError):
        return Status.FAIL, f"GET {where}models answered 404: the base URL usually ends in /v1"
    if isinstance(exc, openai.RateLimitError):
        if exc.code == "insufficient_quota":
            return Status.FAIL, "the account's quota is used up (HTTP 429 insufficient_quota)"
        return Status.WARN, "rate-limited (HTTP 429): the key was not checked; try again"
    if isinstance(exc, openai.APIStatusError):
        return Status.FAIL, f"GET {where}models answered HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return Status.FAIL, f"no answer from {where} within {NETWORK_TIMEOUT_S:.0f}s"
    if isinstance(exc, openai.APIConnectionError):
        return Status.FAIL, f"cannot connect to {where}"
    return Status.FAIL, _reason(exc)


async def _check_models_endpoint(
    name: str, base_url: str | None, api_key: str, key_name: str, model: tuple[str, str]
) -> list[Check]:
    """GET /models with the real client; `model` (its variable, its value) must be listed."""
    import openai

    variable, wanted = model
    client = openai.AsyncOpenAI(
        api_key=api_key,
        base_url=base_url,
        timeout=openai.Timeout(NETWORK_TIMEOUT_S, connect=NETWORK_TIMEOUT_S / 2),
        max_retries=0,  # doctor reports what it sees; the bot retries when it runs
    )
    where = mask_url(str(client.base_url))
    try:
        page = await asyncio.wait_for(client.models.list(), NETWORK_TIMEOUT_S * 1.5)
    except (openai.OpenAIError, TimeoutError) as exc:
        status, detail = _api_failure(exc, key_name, where)
        return [Check(name, status, detail)]
    finally:
        await client.close()
    ids = [entry.id for entry in page.data]
    if wanted not in ids:
        listed = ", ".join(ids[:5]) + (", …" if len(ids) > 5 else "")
        return _fail(name, f"{where} does not list {variable}={wanted} (it lists: {listed})")
    return _ok(name, f"{where} serves {wanted}")


async def _check_model_server(settings: Settings) -> list[Check]:
    key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else _PLACEHOLDER_KEY
    assert settings.llm_base_url is not None
    return await _check_models_endpoint(
        "model", settings.llm_base_url, key, "LLM_API_KEY", ("LLM_MODEL", settings.llm_model)
    )


async def check_openai(settings: Settings) -> list[Check]:
    if settings.openai_api_key is None:
        return _skip("openai", "OPENAI_API_KEY not set: no GPT fallback")
    checks = await _check_models_endpoint(
        "openai",
        settings.openai_base_url,
        settings.openai_api_key.get_secret_value(),
        "OPENAI_API_KEY",
        ("OPENAI_MODEL", settings.openai_model),
    )
    if checks[0].status is Status.OK:
        return _ok("openai", f"key accepted; {checks[0].detail}")
    return checks


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
        return _fail("backend", "no backend can answer: set LLM_MODEL or OPENAI_API_KEY")
    working = [label for label, status in candidates if status is Status.OK]
    others = [label for label, status in candidates if status is not Status.OK]
    if working:
        detail = "answers with " + ", then ".join(working)
        return _ok("backend", detail + (f" ({', '.join(others)} not usable)" if others else ""))
    if any(status is Status.WARN for _, status in candidates):
        return _warn("backend", "no backend checked yet: see the warnings above")
    return _fail("backend", "no backend can answer: each one configured failed above")


# -- Slack and Discord ---------------------------------------------------------------------------


async def check_slack(settings: Settings) -> list[Check]:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.platforms.slack import DEFAULT_API_URL

    if settings.slack_bot_token is None:
        present = [
            name
            for name, value in (
                ("SLACK_SIGNING_SECRET", settings.slack_signing_secret),
                ("SLACK_APP_TOKEN", settings.slack_app_token),
            )
            if value is not None
        ]
        if present:
            return _fail("slack", f"SLACK_BOT_TOKEN is not set, but {' and '.join(present)} is")
        return _skip("slack", "SLACK_BOT_TOKEN not set")
    client = AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url or DEFAULT_API_URL,
        timeout=int(NETWORK_TIMEOUT_S),
    )
    auth, mode = await asyncio.gather(_slack_auth(client), _slack_mode(settings, client))
    return [auth, mode]


async def _slack_auth(client: AsyncWebClient) -> Check:
    from slack_sdk.errors import SlackApiError

    try:
        response = await asyncio.wait_for(client.auth_test(), NETWORK_TIMEOUT_S)
    except SlackApiError as exc:
        reason = exc.response.get("error") or f"HTTP {exc.response.status_code}"
        return Check("slack", Status.FAIL, f"Slack rejected SLACK_BOT_TOKEN (auth.test: {reason})")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        where = mask_url(client.base_url)
        return Check("slack", Status.FAIL, f"cannot reach {where} ({type(exc).__name__})")
    who = f"@{response.get('user')} ({response.get('user_id')})"
    team = f"{response.get('team')} ({response.get('team_id')})"
    return Check("slack", Status.OK, f"auth.test: SLACK_BOT_TOKEN is {who} in {team}")


async def _slack_mode(settings: Settings, client: AsyncWebClient) -> Check:
    from bot.platforms.slack import EVENTS_PATH, StartError, check_app_token, check_credentials

    if settings.slack_app_token is not None:
        try:
            app_token = settings.slack_app_token.get_secret_value()
            await asyncio.wait_for(check_app_token(client, app_token), NETWORK_TIMEOUT_S)
        except StartError as exc:  # the same line `supportbot slack` stops with
            return Check("slack-mode", Status.FAIL, str(exc))
        except TimeoutError:
            return Check("slack-mode", Status.FAIL, f"no answer from {client.base_url}")
        detail = "Socket Mode: apps.connections.open accepts SLACK_APP_TOKEN"
        return Check("slack-mode", Status.OK, detail)
    problem = check_credentials(settings)
    if problem is not None:
        return Check("slack-mode", Status.FAIL, problem)
    # Only Slack can tell whether the secret is right: its first request is refused otherwise.
    return Check(
        "slack-mode",
        Status.OK,
        f"HTTP mode: SLACK_SIGNING_SECRET is set; Slack must reach POST {EVENTS_PATH} on port "
        f"{settings.port}",
    )


async def check_discord(settings: Settings) -> list[Check]:
    if settings.discord_token is None:
        return _skip("discord", "DISCORD_TOKEN not set")
    import discord

    # discord.py's own HTTP login (GET /users/@me), as the bot does before the gateway.
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    try:
        user = await asyncio.wait_for(
            http.static_login(settings.discord_token.get_secret_value()), NETWORK_TIMEOUT_S
        )
        app = await asyncio.wait_for(http.application_info(), NETWORK_TIMEOUT_S)
    except discord.LoginFailure:
        return _fail("discord", "Discord rejected DISCORD_TOKEN (HTTP 401): reset the bot token")
    except discord.HTTPException as exc:
        return _fail("discord", f"Discord's API answered HTTP {exc.status}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _fail("discord", f"cannot reach Discord's API ({type(exc).__name__})")
    finally:
        await http.close()
    if not isinstance(user, dict) or not isinstance(app, dict):  # e.g. a proxy's HTML page
        return _fail("discord", "Discord's API answered with something other than JSON")
    who = f"{user.get('username')} (id {user.get('id')})"
    if not int(app.get("flags", 0)) & _MESSAGE_CONTENT_FLAGS:
        return _fail(
            "discord",
            f"logged in as {who}, but the Message Content intent is off: turn it on in the "
            "Developer Portal (Bot → Privileged Gateway Intents)",
        )
    return _ok("discord", f"logged in as {who}; Message Content intent on")
