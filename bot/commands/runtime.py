"""The runtime, built once by each command: Redis (embedded when REDIS_URL is unset), the store,
the LLM chain and the SupportService. Platforms are handed what they need from it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.config import Settings
from bot.conversation import StoreError
from bot.llm.base import LLM
from bot.llm.chain import Backend, LLMChain
from bot.ops.metrics import PrometheusObserver
from bot.ops.redis_client import RedisUrlError, connect_redis
from bot.ops.redis_server import RedisServer
from bot.sampling import KnowledgeChoice
from bot.service import SupportService
from bot.store import RedisStore

if TYPE_CHECKING:
    from bot.knowledge.base import KnowledgeBase
    from bot.llm.engine import BatchingEngine
    from bot.llm.simple_engine import SimpleEngine

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """The bot cannot serve as configured; str() is one line for the operator. `exit_code`:
    2 when the configuration is invalid (fix it), 1 when a dependency is unreachable."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def redis_startup_error(exc: RedisUrlError | RedisError | OSError, url: str) -> StartupError:
    """One line naming REDIS_URL for a Redis that cannot be used: invalid (a bad URL, a wrong
    password, a database index the server does not have) or unreachable. Never the password."""
    if isinstance(exc, RedisUrlError):
        return StartupError(str(exc), exit_code=2)
    cause = exc
    text = str(cause).lower()
    parts = urlsplit(url)
    where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
    if isinstance(cause, AuthenticationError) or "noauth" in text or "wrongpass" in text:
        return StartupError(
            f"REDIS_URL: Redis at {where} refused the credentials (wrong or missing password "
            "or user); fix the password in REDIS_URL",
            exit_code=2,
        )
    if "db index" in text or "invalid database" in text:
        return StartupError(
            f"REDIS_URL: Redis at {where} has no database {parts.path.strip('/')} (the index "
            "is out of range); use one it has, such as /0",
            exit_code=2,
        )
    reason = "timed out" if isinstance(cause, TimeoutError | RedisTimeoutError) else "failed"
    return StartupError(
        f"REDIS_URL: cannot reach Redis at {where} (connection {reason}); "
        "check that it is running and the host and port are right",
        exit_code=1,
    )


@dataclass
class Runtime:
    service: SupportService
    store: RedisStore
    llm: LLMChain
    embedded_redis: RedisServer | None = None
    _closed: bool = field(default=False, repr=False)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when Redis answers and a backend (local model or GPT) can serve."""
        checks: dict[str, str] = {}
        try:
            await self.store.ping()
            checks["redis"] = "ok"
        except StoreError as exc:
            checks["redis"] = f"unreachable: {exc}"
        for status in self.llm.status():
            checks[status.role] = f"{status.name}: {status.describe()}"
        ready = checks["redis"] == "ok" and self.llm.ready
        return ready, checks

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.llm.aclose()
            await self.store.aclose()
        finally:
            if self.embedded_redis is not None:
                await asyncio.to_thread(self.embedded_redis.stop)


def build_backends(settings: Settings) -> LLMChain:
    """The primary (in-process model, or LLM_BASE_URL) and the GPT fallback, per the contract,
    each with its own timeout: LLM_TIMEOUT_SECONDS for the primary, OPENAI_TIMEOUT_SECONDS for
    GPT."""
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
            # vLLM publishes its max_model_len in /v1/models: read it unless the operator set it.
            discover_context=settings.llm_context_tokens is None,
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
            discover_context=settings.openai_base_url is not None
            and "openai_context_tokens" not in settings.model_fields_set,
        )
    return LLMChain(
        Backend(primary, settings.llm_timeout_seconds) if primary else None,
        Backend(fallback, settings.openai_timeout_seconds) if fallback else None,
        overflow_to_fallback=settings.llm_overflow == "gpt",
    )


def build_local(settings: Settings, engine: str | None = None) -> BatchingEngine | SimpleEngine:
    """The in-process model, with the engine LLM_ENGINE (or `engine`) names; loaded by start()."""
    # Imported here so that `supportbot chat` with LLM_MODEL=none never imports torch.
    from bot.llm.engine import BatchingEngine
    from bot.llm.loader import ModelLoader
    from bot.llm.simple_engine import SimpleEngine

    loader = ModelLoader(
        settings.llm_model,
        device=settings.llm_device,
        dtype=settings.llm_dtype,
        trust_remote_code=settings.llm_trust_remote_code,
        context_tokens=settings.llm_context_tokens,
    )
    if (engine or settings.llm_engine) == "simple":
        return SimpleEngine(loader, first_token_timeout_s=settings.llm_timeout_seconds)
    return BatchingEngine(
        loader,
        max_in_flight=settings.llm_max_queue,
        warmup_timeout_s=settings.llm_timeout_seconds,
        attention=settings.llm_attention,
    )


async def open_redis(settings: Settings) -> tuple[Redis, RedisServer | None]:
    """A Redis client for REDIS_URL, or for an embedded server started here (returned for the
    caller to stop), that has answered a PING. Raises StartupError, one line naming REDIS_URL,
    when it cannot be used; nothing is left running then."""
    embedded: RedisServer | None = None
    if settings.redis_url is None:
        # Starting redis-server waits for it to answer: not on the event loop.
        embedded = await asyncio.to_thread(RedisServer(settings.data_dir).start)
        url = embedded.url
    else:
        url = settings.redis_url.get_secret_value()
    try:
        redis = connect_redis(url)
    except RedisUrlError as exc:
        raise redis_startup_error(exc, url) from None
    try:
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            raise redis_startup_error(exc, url) from None
    except BaseException:
        try:
            await redis.aclose()
        finally:
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
        raise
    return redis, embedded


def build_knowledge(settings: Settings, redis: Redis, *, embed: bool = True) -> KnowledgeBase:
    """The knowledge base over `redis`; with KB_EMBED_MODEL (and `embed`) semantic search too.
    The model loads on first use, once, off the event loop."""
    from bot.knowledge.base import KnowledgeBase
    from bot.knowledge.embed import Embedder
    from bot.knowledge.store import KnowledgeStore

    embedder = None
    if embed and settings.kb_embed_enabled:
        embedder = Embedder(settings.kb_embed_model)
    return KnowledgeBase(KnowledgeStore(redis), embedder, min_similarity=settings.kb_min_similarity)


async def build(
    settings: Settings, *, llm: LLMChain | None = None, require_backend: bool = False
) -> Runtime:
    """Connect Redis (starting the embedded server when REDIS_URL is unset) and load backends.

    With `require_backend` (the Slack and Discord services) the bot refuses to start when no
    backend can answer, so it never joins a workspace only to apologise for every question.
    """
    redis, embedded = await open_redis(settings)
    store = RedisStore(
        redis,
        defaults=settings.default_sampling,
        max_new_tokens_limit=settings.llm_max_new_tokens_limit,
        max_messages=settings.history_max_messages,
        ttl_seconds=settings.history_ttl_seconds,
        knowledge_defaults=KnowledgeChoice(settings.kb_mode, settings.kb_collection),
        answer_ttl_s=settings.report_retention_days * 86400,
        lease_s=settings.event_lease_seconds,
    )
    chain = llm
    try:
        chain = chain or build_backends(settings)
        await chain.start()
        if require_backend and not chain.ready:
            reasons = "; ".join(f"{s.name}: {s.describe()}" for s in chain.status())
            raise StartupError(
                f"no backend can answer ({reasons or 'none configured'}); set LLM_MODEL to a "
                "loadable model or OPENAI_API_KEY for GPT, and run `supportbot doctor`"
            )
    except BaseException:
        try:
            if chain is not None:
                await chain.aclose()
            await store.aclose()
        finally:
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
        raise
    service = SupportService(
        store=store,
        llm=chain,
        persona=settings.system_prompt,
        scope=settings.history_scope,
        observer=PrometheusObserver(),
        knowledge=build_knowledge(settings, store.redis),
        kb_top_k=settings.kb_top_k,
    )
    return Runtime(service=service, store=store, llm=chain, embedded_redis=embedded)


def _secret(value: object) -> str | None:
    from pydantic import SecretStr

    return value.get_secret_value() if isinstance(value, SecretStr) else None
