"""The runtime each command builds: the embedded redis-server handled off the event loop, and
everything opened so far closed again when start-up fails or is cancelled."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from bot.commands.runtime import StartupError, build
from bot.config import load_settings
from bot.llm.chain import LLMChain
from bot.ops.redis_server import RedisServer
from tests.support.backends import ScriptedLLM


class Hanging(ScriptedLLM):
    """A model whose load never ends (a hung download, say)."""

    loading: asyncio.Event | None = None

    async def start(self) -> None:
        assert self.loading is not None
        self.loading.set()
        await asyncio.sleep(3600)


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, RedisServer]]:
    """Every embedded server start and stop, with the thread it ran on."""
    seen: list[tuple[str, int, RedisServer]] = []
    start, stop = RedisServer.start, RedisServer.stop

    def recorded_start(self: RedisServer, timeout_s: float = 10.0) -> RedisServer:
        seen.append(("start", threading.get_ident(), self))
        return start(self, timeout_s)

    def recorded_stop(self: RedisServer) -> None:
        seen.append(("stop", threading.get_ident(), self))
        stop(self)

    monkeypatch.setattr(RedisServer, "start", recorded_start)
    monkeypatch.setattr(RedisServer, "stop", recorded_stop)
    return seen


async def test_the_embedded_redis_server_starts_and_stops_off_the_event_loop(
    tmp_path: Path, servers: list[tuple[str, int, RedisServer]]
) -> None:
    settings = load_settings(data_dir=tmp_path, llm_model="none")
    runtime = await build(settings, llm=LLMChain(ScriptedLLM()))
    assert (await runtime.readiness())[0]
    await runtime.aclose()
    loop_thread = threading.get_ident()
    assert [what for what, _, _ in servers] == ["start", "stop"]
    assert all(thread != loop_thread for _, thread, _ in servers)


async def test_a_start_up_cancelled_while_the_model_loads_closes_all_it_opened(
    tmp_path: Path, servers: list[tuple[str, int, RedisServer]]
) -> None:
    settings = load_settings(data_dir=tmp_path, llm_model="none")
    backend = Hanging()
    backend.loading = asyncio.Event()
    building = asyncio.create_task(build(settings, llm=LLMChain(backend)))
    await asyncio.wait_for(backend.loading.wait(), 10)
    building.cancel()  # SIGTERM during the model load
    with pytest.raises(asyncio.CancelledError):
        await building
    assert backend.closed
    (server,) = {server for _, _, server in servers}
    assert not server.running


async def test_no_backend_for_a_service_stops_start_up_and_closes_everything(
    tmp_path: Path, servers: list[tuple[str, int, RedisServer]]
) -> None:
    settings = load_settings(data_dir=tmp_path, llm_model="none")
    backend = ScriptedLLM(fail_start="cannot load")
    with pytest.raises(StartupError, match="no backend can answer"):
        await build(settings, llm=LLMChain(backend), require_backend=True)
    assert backend.closed
    (server,) = {server for _, _, server in servers}
    assert not server.running
