"""/healthz, /readyz and /metrics: status codes and content, over a real HTTP server."""

from __future__ import annotations

import aiohttp
import pytest
from redis.asyncio import Redis

from bot.commands.runtime import Runtime
from bot.conversation import ConversationKey
from bot.llm.chain import LLMChain
from bot.ops.health import serve_health
from bot.ops.metrics import PrometheusObserver
from bot.ops.redis_server import free_port
from bot.service import SupportService, User
from tests.conftest import make_store
from tests.support.backends import ScriptedLLM


async def fetch(port: int, path: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, response.headers["Content-Type"], await response.text()


def wire(redis: Redis, primary: ScriptedLLM, fallback: ScriptedLLM | None) -> Runtime:
    """A Runtime as build() makes it (metrics observed), over the test's Redis and backends."""
    store = make_store(redis)
    llm = LLMChain(primary, fallback)
    service = SupportService(store=store, llm=llm, persona="p", observer=PrometheusObserver())
    return Runtime(service=service, store=store, llm=llm)


@pytest.fixture
async def runtime(redis: Redis):
    built = wire(redis, ScriptedLLM(), ScriptedLLM(label="gpt"))
    await built.llm.start()
    return built


async def test_ready_alive_and_metrics(runtime):
    port = free_port()
    runner = await serve_health(port, runtime.readiness, host="127.0.0.1")
    try:
        async for _ in runtime.service.ask(ConversationKey("slack", "T", "C"), User("U"), "hi"):
            pass
        assert await fetch(port, "/healthz") == (200, "application/json; charset=utf-8",
                                                 '{"status": "alive"}')  # fmt: skip
        status, _, body = await fetch(port, "/readyz")
        assert status == 200 and '"status": "ready"' in body and '"redis": "ok"' in body
        status, content_type, metrics = await fetch(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert 'supportbot_questions_total{platform="slack"}' in metrics
        assert 'supportbot_answers_total{backend="test:scripted",platform="slack"}' in metrics
        assert "supportbot_answer_seconds_bucket" in metrics
        assert "supportbot_first_token_seconds_bucket" in metrics
        assert "supportbot_engine_requests" in metrics
    finally:
        await runner.cleanup()


async def test_not_ready_without_a_backend(redis):
    runtime = wire(redis, ScriptedLLM(fail_start="no GPU"), None)
    await runtime.llm.start()
    port = free_port()
    runner = await serve_health(port, runtime.readiness, host="127.0.0.1")
    try:
        status, _, body = await fetch(port, "/readyz")
        assert status == 503 and '"status": "not ready"' in body and "no GPU" in body
        assert (await fetch(port, "/healthz"))[0] == 200  # alive, just not ready
    finally:
        await runner.cleanup()


async def test_not_ready_when_redis_is_unreachable(runtime):
    runtime.store = make_store(Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1))
    ready, checks = await runtime.readiness()
    assert not ready and checks["redis"].startswith("unreachable")
    await runtime.store.aclose()
