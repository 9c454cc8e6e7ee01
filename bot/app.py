"""Wiring: Settings → Redis, stores, backends and the SupportService. Front doors call build()."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.config import Settings
from bot.conversation import HistoryStore
from bot.llm.base import LLM
from bot.llm.fallback import FallbackLLM
from bot.ops.redis_server import RedisServer
from bot.sampling import SettingsStore
from bot.service import SupportService

logger = logging.getLogger(__name__)

REDIS_MAX_CONNECTIONS = 64  # per process; more commands in flight wait for a free connection


@dataclass
class Runtime:
    service: SupportService
    redis: Redis
    llm: FallbackLLM
    embedded_redis: RedisServer | None = None
    _closed: bool = field(default=False, repr=False)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when Redis answers and a backend (local model or GPT) can serve."""
        checks: dict[str, str] = {}
        try:
            await self.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # any failure means not ready; the reason is for operators
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        for status in self.llm.status():
            checks[f"{status.role}"] = f"{status.name}: {status.state}"
        ready = checks["redis"] == "ok" and self.llm.ready
        return ready, checks

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.llm.aclose()
        await self.redis.aclose()
        if self.embedded_redis is not None:
            self.embedded_redis.stop()


def build_backends(settings: Settings) -> FallbackLLM:
    """The primary (in-process model, or LLM_BASE_URL) and the GPT fallback, per the contract."""
    primary: LLM | None = None
    if settings.llm_base_url:
        from bot.llm.openai_chat import OpenAIChatLLM

        primary = OpenAIChatLLM(
            model=settings.llm_model,
            api_key=_secret(settings.llm_api_key),
            base_url=settings.llm_base_url,
            context_window=settings.llm_context_tokens or 32_768,
            timeout_s=settings.llm_timeout_seconds,
            max_retries=settings.openai_max_retries,
            send_top_k=True,
            label="server",
        )
    elif settings.local_model_enabled:
        primary = build_local(settings)
    fallback: LLM | None = None
    if settings.openai_api_key is not None:
        from bot.llm.openai_chat import OpenAIChatLLM

        fallback = OpenAIChatLLM(
            model=settings.openai_model,
            api_key=_secret(settings.openai_api_key),
            base_url=settings.openai_base_url,
            context_window=settings.openai_context_tokens,
            timeout_s=settings.openai_timeout_seconds,
            max_retries=settings.openai_max_retries,
        )
    return FallbackLLM(
        primary,
        fallback,
        stall_timeout_s=settings.llm_timeout_seconds,
        overflow_to_fallback=settings.llm_overflow == "gpt",
    )


def build_local(settings: Settings) -> LLM:
    """The in-process model, with the engine LLM_ENGINE names."""
    # Imported here so that `supportbot chat` with LLM_MODEL=none never imports torch.
    from bot.llm.local import LocalLLM

    options: dict[str, Any] = {
        "device": settings.llm_device,
        "dtype": settings.llm_dtype,
        "trust_remote_code": settings.llm_trust_remote_code,
        "context_tokens": settings.llm_context_tokens,
        "first_token_timeout_s": settings.llm_timeout_seconds,
    }
    if settings.llm_engine == "simple":
        return LocalLLM(settings.llm_model, **options)
    from bot.llm.batching import BatchingLocalLLM

    return BatchingLocalLLM(
        settings.llm_model,
        max_in_flight=settings.llm_max_queue,
        **options,
    )


def connect_redis(url: str) -> Redis:
    """The bot's Redis client: it rides out bursts and reconnects by itself after Redis restarts.

    - A burst of questions waits for a free connection (up to 10 s) instead of failing: redis-py's
      default pool raises "Too many connections" at once past 100 commands in flight.
    - Pooled connections go stale when Redis restarts, and without retries the first command on
      each of them fails ("Connection closed by server") although Redis is back. So a command
      that meets a closed or refused connection is retried on a fresh one, 5 times with
      exponential backoff and equal jitter: 1.1 to 2.2 s in all, which rides out a restart; a
      longer outage ends in a RedisError that the service turns into a clear message with an
      error id. Only connection errors are retried: after a timeout the command may have run,
      and the turn should fail rather than wait again.
    - `socket_timeout` bounds a hung server, which would otherwise hold a conversation's turn
      (and every later question in that channel) forever.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=10,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=10,
        retry=Retry(
            EqualJitterBackoff(cap=1.0, base=0.04),
            retries=5,
            supported_errors=(RedisConnectionError,),
        ),
        retry_on_error=[RedisConnectionError],
    )
    return Redis.from_pool(pool)


class StartupError(Exception):
    """The bot cannot serve as configured; str() is one line for the operator."""


async def build(
    settings: Settings, *, llm: FallbackLLM | None = None, require_backend: bool = False
) -> Runtime:
    """Connect Redis (starting the embedded server when REDIS_URL is unset) and load backends.

    With `require_backend` (the Slack and Discord services) the bot refuses to start when no
    backend can answer, so it never joins a workspace only to apologise for every question.
    """
    embedded: RedisServer | None = None
    if settings.redis_url is None:
        embedded = RedisServer(settings.data_dir).start()
        url = embedded.url
    else:
        url = settings.redis_url.get_secret_value()
    redis = connect_redis(url)
    try:
        await redis.ping()
        llm = llm or build_backends(settings)
        await llm.start()
        if require_backend and not llm.ready:
            await llm.aclose()
            reasons = "; ".join(f"{s.name}: {s.state}" for s in llm.status()) or "none configured"
            raise StartupError(
                f"no backend can answer ({reasons}); set LLM_MODEL to a loadable model or "
                "OPENAI_API_KEY for GPT, and run `supportbot doctor`"
            )
    except BaseException:
        await redis.aclose()
        if embedded is not None:
            embedded.stop()
        raise
    history = HistoryStore(
        redis,
        max_messages=settings.history_max_messages,
        ttl_seconds=settings.history_ttl_seconds,
    )
    store = SettingsStore(
        redis,
        defaults=settings.default_sampling,
        max_new_tokens_limit=settings.llm_max_new_tokens_limit,
    )
    service = SupportService(
        redis=redis,
        history=history,
        settings=store,
        llm=llm,
        persona=settings.system_prompt,
        scope=settings.history_scope,
    )
    return Runtime(service=service, redis=redis, llm=llm, embedded_redis=embedded)


def _secret(value: object) -> str | None:
    from pydantic import SecretStr

    return value.get_secret_value() if isinstance(value, SecretStr) else None
