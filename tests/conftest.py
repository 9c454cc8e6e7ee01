"""Shared fixtures: a real redis-server on a free port, and the service wired over it.

Nothing here imports torch or transformers: the model fixtures import their builder when a test
asks for one, so `pytest tests/unit -m "not slow"` runs without touching a model library.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bot.llm.chain import LLMChain
from bot.ops.redis_server import RedisServer, free_port
from bot.sampling import SamplingSettings
from bot.service import SupportService
from bot.store import RedisStore
from tests.support.backends import ScriptedLLM

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port(), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


DEFAULTS = SamplingSettings(temperature=0.7, top_k=50, top_p=0.95, max_new_tokens=64)


@pytest.fixture
def scripted() -> ScriptedLLM:
    return ScriptedLLM()


def make_service(
    redis: Redis,
    primary: ScriptedLLM | None,
    fallback: ScriptedLLM | None = None,
    *,
    max_messages: int = 20,
    ttl_seconds: int = 3600,
    scope: str = "channel",
    persona: str = "You are a test persona.",
    limit: int = 1024,
    chain: LLMChain | None = None,
) -> SupportService:
    """The service over `primary` then `fallback`, or over `chain` when a test builds its own."""
    return SupportService(
        store=make_store(redis, max_messages=max_messages, ttl_seconds=ttl_seconds, limit=limit),
        llm=chain or LLMChain(primary, fallback),
        persona=persona,
        scope=scope,  # type: ignore[arg-type]
    )


def make_store(
    redis: Redis, *, max_messages: int = 20, ttl_seconds: int = 3600, limit: int = 1024
) -> RedisStore:
    return RedisStore(
        redis,
        defaults=DEFAULTS,
        max_new_tokens_limit=limit,
        max_messages=max_messages,
        ttl_seconds=ttl_seconds,
    )


@pytest.fixture
async def service(redis: Redis, scripted: ScriptedLLM) -> SupportService:
    svc = make_service(redis, scripted)
    await svc.llm.start()
    return svc


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# Fixtures defined in tests/fixtures, registered here for every test.
from tests.fixtures.fake_openai import fake_openai_fixture  # noqa: E402, F401
from tests.fixtures.fake_slack import fake_slack_fixture  # noqa: E402, F401


@pytest.fixture(scope="session")
def tiny_exaone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny EXAONE 3.5 checkpoint (tests/fixtures/tiny_exaone.py); imports torch on first use."""
    from tests.fixtures.tiny_exaone import build_tiny_exaone

    return build_tiny_exaone(tmp_path_factory.mktemp("tiny-exaone") / "EXAONE-3.5-tiny-Instruct")


@pytest.fixture(scope="session")
def tiny_exaone_factory(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`build(seed=0, **options) -> Path` for checkpoint variants; imports torch on first use."""
    from tests.fixtures.tiny_exaone import tiny_exaone_builder

    return tiny_exaone_builder(tmp_path_factory)


# -- The whole-suite secrets scan (tests/support/log_scan.py says what it covers and why) -------
from tests.support import secrets  # noqa: E402
from tests.support.log_scan import MARKER, SecretScan  # noqa: E402

_SCAN = SecretScan()
_EXEMPT: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: logs a secret deliberately (redaction tests); not scanned"
    )
    _SCAN.install()


def pytest_collection_finish(session: pytest.Session) -> None:
    # Fake secrets that test modules define for themselves (API_KEY = "sk-..."), collected ones
    # included wherever they live.
    modules = {getattr(item, "module", None) for item in session.items}
    secrets.harvest(m.__name__ for m in modules if m is not None)
    secrets.harvest()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    exempt = item.get_closest_marker(MARKER) is not None
    if exempt:
        _EXEMPT.add(item.nodeid)
    _SCAN.begin(item.nodeid, exempt)
    try:
        return (yield)
    finally:
        _SCAN.end()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # The teardown report carries what the test printed in all three phases.
    if report.when != "teardown" or report.nodeid in _EXEMPT:
        return
    _SCAN.test = report.nodeid
    _SCAN.check("captured stdout", report.capstdout)
    _SCAN.check("captured stderr", report.capstderr)
    _SCAN.test = "-"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SCAN.uninstall()
    if _SCAN.leaks and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = list(_SCAN.report())
    terminalreporter.section("secrets scan", red=bool(_SCAN.leaks), green=not _SCAN.leaks)
    for line in lines:
        terminalreporter.write_line(line)
