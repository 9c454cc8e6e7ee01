"""`supportbot doctor`'s checks, one by one, against real parts: the tests' redis-server and an
embedded one, the tiny EXAONE checkpoint loaded by transformers, the real `openai` client against
the fake OpenAI server, slack_sdk against the fake Slack Web API, and discord.py's own HTTP login
against a small fake of Discord's REST API on 127.0.0.1."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import discord
import pytest
import torch
from aiohttp import web

from bot.commands import doctor
from bot.commands.doctor import Check, Status, model_check
from bot.config import Settings
from bot.ops.redis_server import free_port
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.fake_slack import (
    APP_TOKEN,
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
    fake_slack_fixture,  # noqa: F401
)

OPENAI_KEY = "sk-doctor-0123456789abcdefghijkl"
DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.doctor-discord-secret"
REDIS_PASSWORD = "hunter2-doctor-redis-pw"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")

Make = Callable[..., Settings]


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Make:
    """Settings from these values only: the environment's own variables are cleared."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no .env from the checkout

    def build(**values: Any) -> Settings:
        defaults: dict[str, Any] = {"data_dir": tmp_path / "data", "llm_model": "none"}
        return Settings(_env_file=None, **{**defaults, **values})  # type: ignore[call-arg]

    return build


def only(checks: list[Check]) -> Check:
    assert len(checks) == 1, checks
    return checks[0]


def closed_port_url(path: str = "/v1") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


def closed_redis_url(userinfo: str) -> str:
    return f"redis://{userinfo}@127.0.0.1:{free_port()}/0"


# -- the output -----------------------------------------------------------------------------------


def test_lines_align_the_status_in_one_column() -> None:
    lines = [Check("redis", s, "detail").line for s in Status]
    assert lines == [
        "ok    redis: detail",
        "warn  redis: detail",
        "skip  redis: detail",
        "FAIL  redis: detail",
    ]


def test_exit_status_and_summary_count_failures_only() -> None:
    fine = [Check("a", Status.OK, ""), Check("b", Status.SKIP, ""), Check("c", Status.WARN, "")]
    assert doctor.exit_status(fine) == 0
    broken = [*fine, Check("d", Status.FAIL, "")]
    assert doctor.exit_status(broken) == 1
    assert doctor.summary(broken) == "doctor: 1 ok, 1 warn, 1 skip, 1 FAIL; exit 1"


def test_urls_are_shown_with_the_password_masked() -> None:
    assert (
        doctor.mask_url(f"redis://:{REDIS_PASSWORD}@cache:6379/0") == "redis://:****@cache:6379/0"
    )
    assert doctor.mask_url("rediss://bot:pw@h/1?password=x&db=1") == (
        "rediss://bot:****@h/1?password=****&db=1"
    )
    assert doctor.mask_url("unix:///run/redis.sock?db=0") == "unix:///run/redis.sock?db=0"


def test_inconsistent_sharding_is_a_configuration_error(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_SHARD_COUNT", "2")
    monkeypatch.setenv("DISCORD_SHARD_IDS", "0,2")
    out = io.StringIO()
    assert doctor.run_doctor(out=out) == 2
    assert out.getvalue().splitlines() == [
        "FAIL  config: invalid configuration: DISCORD_SHARD_IDS: shard 2 is not below "
        "DISCORD_SHARD_COUNT (2)"
    ]


# -- Redis ----------------------------------------------------------------------------------------


async def test_redis_url_reachable_and_writable(make: Make, redis_server, redis) -> None:
    check = only(await doctor.check_redis(make(redis_url=redis_server.url)))
    assert check.status is Status.OK, check
    assert "answers (SET/GET/DEL; Redis " in check.detail
    assert await redis.keys("supportbot:doctor:*") == []  # the probe cleaned up after itself


async def test_unreachable_redis_fails_without_its_password(make: Make) -> None:
    check = only(await doctor.check_redis(make(redis_url=closed_redis_url(f":{REDIS_PASSWORD}"))))
    assert check.status is Status.FAIL
    assert "cannot use redis://:****@127.0.0.1:" in check.detail
    assert REDIS_PASSWORD not in check.line


async def test_embedded_redis_starts_answers_and_stops(make: Make, tmp_path: Path) -> None:
    check = only(await doctor.check_redis(make(data_dir=tmp_path / "state")))
    assert check.status is Status.OK, check
    assert check.detail.startswith("embedded redis-server ")
    assert f"DATA_DIR {tmp_path / 'state'} is writable" in check.detail
    # No persistence: a bot running over the same DATA_DIR keeps sole use of its files.
    assert not any((tmp_path / "state").iterdir())


async def test_unusable_data_dir_fails_naming_it(make: Make, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    check = only(await doctor.check_redis(make(data_dir=blocker / "data")))
    assert check.status is Status.FAIL
    assert "DATA_DIR" in check.detail


# -- GPU ------------------------------------------------------------------------------------------


async def test_gpu_is_skipped_when_no_local_model_runs(make: Make) -> None:
    assert only(await doctor.check_gpu(make())).line == "skip  gpu: not used: LLM_MODEL=none"
    served = make(llm_model="m", llm_base_url="http://127.0.0.1:1/v1")
    assert only(await doctor.check_gpu(served)).status is Status.SKIP
    cpu = make(llm_model="m", llm_device="cpu")
    assert only(await doctor.check_gpu(cpu)).line == "skip  gpu: not used: LLM_DEVICE=cpu"


@no_gpu
async def test_no_gpu_is_a_warning_with_auto_and_a_failure_when_cuda_is_asked_for(
    make: Make,
) -> None:
    auto = only(await doctor.check_gpu(make(llm_model="m")))
    assert auto.status is Status.WARN
    assert "no CUDA device" in auto.detail and "runs on the CPU" in auto.detail
    asked = only(await doctor.check_gpu(make(llm_model="m", llm_device="cuda:1")))
    assert asked.status is Status.FAIL
    assert "LLM_DEVICE=cuda:1 but no CUDA device" in asked.detail


# -- the model ------------------------------------------------------------------------------------


async def test_tiny_exaone_loads_on_cpu_with_dtype_and_size(make: Make, tiny_exaone_dir) -> None:
    settings = make(llm_model=str(tiny_exaone_dir), llm_device="cpu")
    check = only(await doctor.check_model(settings))
    assert check.status is Status.OK, check
    assert check.detail.startswith(f"{tiny_exaone_dir} on cpu as float32, ")
    assert "K parameters" in check.detail and "MiB of weights" in check.detail
    assert "loaded in " in check.detail and "first token in " in check.detail


async def test_a_load_that_overruns_its_time_fails_without_waiting(
    make: Make, tiny_exaone_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_check, "MODEL_TIMEOUT_S", 0.001)
    check = only(await doctor.check_model(make(llm_model=str(tiny_exaone_dir), llm_device="cpu")))
    assert check.status is Status.FAIL and "did not load within" in check.detail
    assert check.abandoned  # `supportbot doctor` then exits without joining the loading thread


async def test_a_missing_model_directory_fails_naming_it(make: Make) -> None:
    settings = make(llm_model="/nonexistent/EXAONE", llm_device="cpu")
    check = only(await doctor.check_model(settings))
    assert check.line == "FAIL  model: LLM_MODEL=/nonexistent/EXAONE: no such directory"


async def test_a_directory_without_a_checkpoint_fails_with_the_loaders_reason(
    make: Make, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    settings = make(llm_model=str(empty), llm_device="cpu")
    check = only(await doctor.check_model(settings))
    assert check.status is Status.FAIL
    assert str(empty) in check.detail and "config.json" in check.detail


@pytest.fixture
def hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


async def test_a_hub_model_not_in_the_cache_is_not_downloaded(
    make: Make, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    settings = make(llm_model="LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", llm_device="cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # nothing may reach the network
    # Not cached, and the hub cannot be reached from the tests: the bot could not get it now,
    # so it is a FAIL with the bot's own one-line reason (a reachable hub makes it a warning).
    check = only(await doctor.check_model(settings))
    assert check.status is Status.FAIL
    assert "could not be downloaded" in check.detail
    assert "point LLM_MODEL at a checkpoint directory" in check.detail
    assert list(hf_cache.iterdir()) == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = only(await doctor.check_model(settings))
    assert offline.status is Status.FAIL and "HF_HUB_OFFLINE is set" in offline.detail


async def test_download_goes_through_the_bots_own_path(make: Make, hf_cache: Path) -> None:
    # Offline (conftest), so the bot's snapshot_download cannot fetch it: its reason is shown.
    settings = make(llm_model="LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", llm_device="cpu")
    check = only(await doctor.check_model(settings, download=True))
    assert check.status is Status.FAIL
    assert "'LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct'" in check.detail
    assert "local cache" in check.detail


async def test_a_cached_hub_model_loads_from_the_cache(
    make: Make, hf_cache: Path, tiny_exaone_dir: Path
) -> None:
    repo = hf_cache / "models--test-org--tiny-exaone"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_exaone_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    settings = make(llm_model="test-org/tiny-exaone", llm_device="cpu")
    check = only(await doctor.check_model(settings))
    assert check.status is Status.OK, check
    assert check.detail.startswith("test-org/tiny-exaone on cpu as float32")


async def test_llm_base_url_must_serve_llm_model(make: Make, fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ["LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"]
    served = make(
        llm_model="LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", llm_base_url=fake_openai.base_url
    )
    check = only(await doctor.check_model(served))
    assert check.line == (
        f"ok    model: {fake_openai.base_url}/ serves LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
    )
    other = make(llm_model="other/model", llm_base_url=fake_openai.base_url)
    missing = only(await doctor.check_model(other))
    assert missing.status is Status.FAIL
    assert "does not list LLM_MODEL=other/model" in missing.detail


# -- OpenAI ---------------------------------------------------------------------------------------


def gpt(make: Make, base_url: str, **values: Any) -> Settings:
    return make(openai_api_key=OPENAI_KEY, openai_base_url=base_url, **values)


async def test_openai_key_accepted_and_model_listed(make: Make, fake_openai: FakeOpenAI) -> None:
    fake_openai.required_api_key = OPENAI_KEY
    check = only(await doctor.check_openai(gpt(make, fake_openai.base_url)))
    assert check.line == f"ok    openai: key accepted; {fake_openai.base_url}/ serves gpt-4o-mini"
    (request,) = fake_openai.requests
    assert (request.method, request.path) == ("GET", "/v1/models")


async def test_openai_key_rejected_is_a_failure_without_the_key(
    make: Make, fake_openai: FakeOpenAI
) -> None:
    fake_openai.required_api_key = "sk-the-right-one-0123456789"
    check = only(await doctor.check_openai(gpt(make, fake_openai.base_url)))
    assert check.line == "FAIL  openai: OPENAI_API_KEY rejected (HTTP 401)"
    assert len(fake_openai.requests) == 1  # no retries


async def test_openai_problems_each_have_their_line(make: Make, fake_openai: FakeOpenAI) -> None:
    unlisted = only(await doctor.check_openai(gpt(make, fake_openai.base_url, openai_model="o9")))
    assert "does not list OPENAI_MODEL=o9 (it lists: gpt-4o-mini)" in unlisted.detail
    no_v1 = fake_openai.base_url.removesuffix("/v1")
    wrong_path = only(await doctor.check_openai(gpt(make, no_v1)))
    assert wrong_path.status is Status.FAIL and "answered 404" in wrong_path.detail
    fake_openai.fail(429)
    limited = only(await doctor.check_openai(gpt(make, fake_openai.base_url)))
    assert limited.status is Status.WARN and "HTTP 429" in limited.detail
    down = only(await doctor.check_openai(gpt(make, closed_port_url())))
    assert down.status is Status.FAIL and "cannot connect to http://127.0.0.1:" in down.detail
    unset = only(await doctor.check_openai(make()))
    assert unset.line == "skip  openai: OPENAI_API_KEY not set: no GPT fallback"


# -- at least one backend -------------------------------------------------------------------------


async def given(*checks: Check) -> list[Check]:
    return list(checks)


async def backend(settings: Settings, model: Status, openai: Status) -> Check:
    return only(
        await doctor.check_backend(
            settings, given(Check("model", model, "")), given(Check("openai", openai, ""))
        )
    )


async def test_backend_verdict(make: Make) -> None:
    settings = make(llm_model="m", openai_api_key=OPENAI_KEY)
    none = await backend(settings, Status.SKIP, Status.SKIP)
    assert none.line == "FAIL  backend: no backend can answer: set LLM_MODEL or OPENAI_API_KEY"
    both = await backend(settings, Status.OK, Status.OK)
    assert both.line == "ok    backend: answers with the local model, then openai:gpt-4o-mini"
    gpt_only = await backend(settings, Status.FAIL, Status.OK)
    assert gpt_only.status is Status.OK and "(the local model not usable)" in gpt_only.detail
    pending = await backend(settings, Status.WARN, Status.SKIP)
    assert pending.status is Status.WARN
    broken = await backend(settings, Status.FAIL, Status.FAIL)
    assert broken.status is Status.FAIL and "no backend can answer" in broken.detail


# -- Slack ----------------------------------------------------------------------------------------


def slack(make: Make, fake_slack: FakeSlack, **values: Any) -> Settings:
    base: dict[str, Any] = {
        "slack_bot_token": BOT_TOKEN,
        "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": fake_slack.url,
    }
    return make(**{**base, **values})


async def test_slack_http_mode(make: Make, fake_slack: FakeSlack) -> None:
    auth, mode = await doctor.check_slack(slack(make, fake_slack))
    assert (
        auth.line
        == "ok    slack: auth.test: SLACK_BOT_TOKEN is @supportbot (U0BOT) in Fake (T0TEST)"
    )
    assert mode.status is Status.OK
    assert mode.detail.startswith("HTTP mode: SLACK_SIGNING_SECRET is set")


async def test_slack_http_mode_without_signing_secret_fails_naming_it(
    make: Make, fake_slack: FakeSlack
) -> None:
    auth, mode = await doctor.check_slack(slack(make, fake_slack, slack_signing_secret=None))
    assert auth.status is Status.OK
    assert mode.status is Status.FAIL
    assert mode.detail.startswith("SLACK_SIGNING_SECRET is not set")


async def test_slack_socket_mode_checks_the_app_token(make: Make, fake_slack: FakeSlack) -> None:
    good = slack(make, fake_slack, slack_signing_secret=None, slack_app_token=APP_TOKEN)
    _, mode = await doctor.check_slack(good)
    assert mode.line == (
        "ok    slack-mode: Socket Mode: apps.connections.open accepts SLACK_APP_TOKEN"
    )
    bad = slack(make, fake_slack, slack_app_token="xapp-1-wrong-0000000000-abcdef")
    _, refused = await doctor.check_slack(bad)
    assert refused.status is Status.FAIL
    assert "Slack rejected SLACK_APP_TOKEN (apps.connections.open: invalid_auth)" in refused.detail


async def test_slack_token_problems(make: Make, fake_slack: FakeSlack) -> None:
    wrong = slack(make, fake_slack, slack_bot_token="xoxb-0000-wrong-token-abcdefgh")
    auth, _ = await doctor.check_slack(wrong)
    assert auth.line == "FAIL  slack: Slack rejected SLACK_BOT_TOKEN (auth.test: invalid_auth)"
    missing = only(await doctor.check_slack(slack(make, fake_slack, slack_bot_token=None)))
    assert missing.line == ("FAIL  slack: SLACK_BOT_TOKEN is not set, but SLACK_SIGNING_SECRET is")
    assert only(await doctor.check_slack(make())).line == "skip  slack: SLACK_BOT_TOKEN not set"
    down = slack(make, fake_slack, slack_api_url=closed_port_url(path="/api/"))
    unreachable, _ = await doctor.check_slack(down)
    assert unreachable.status is Status.FAIL and "cannot reach http://127.0.0.1:" in (
        unreachable.detail
    )


# -- Discord --------------------------------------------------------------------------------------


class FakeDiscord:
    """Discord's REST API as far as a login goes: GET /users/@me and the application."""

    def __init__(self, token: str, flags: int) -> None:
        self.token = token
        self.flags = flags
        self.paths: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v10/users/@me", self._me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self._application)
        return app

    def _authorized(self, request: web.Request) -> bool:
        self.paths.append(request.path)
        return request.headers.get("Authorization") == f"Bot {self.token}"

    async def _me(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        user = {"id": "1234", "username": "supportbot", "discriminator": "0", "avatar": None}
        return _json({**user, "global_name": None, "bot": True})

    async def _application(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        return _json({"id": "99", "name": "supportbot", "flags": self.flags})


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    # Exactly "application/json", as Discord sends it: discord.py parses nothing else.
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord(DISCORD_TOKEN, flags=1 << 19)  # Message Content intent enabled
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    # discord.py builds every URL from Route.BASE: this points its real HTTP client here.
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    yield fake
    await runner.cleanup()


async def test_discord_login_reports_the_bot(make: Make, fake_discord: FakeDiscord) -> None:
    check = only(await doctor.check_discord(make(discord_token=DISCORD_TOKEN)))
    assert check.line == (
        "ok    discord: logged in as supportbot (id 1234); Message Content intent on"
    )
    assert fake_discord.paths == ["/api/v10/users/@me", "/api/v10/oauth2/applications/@me"]


async def test_discord_rejected_token_and_missing_intent(
    make: Make, fake_discord: FakeDiscord
) -> None:
    wrong = only(await doctor.check_discord(make(discord_token="MTIz.wrong.token")))
    assert wrong.line == (
        "FAIL  discord: Discord rejected DISCORD_TOKEN (HTTP 401): reset the bot token"
    )
    fake_discord.flags = 0
    no_intent = only(await doctor.check_discord(make(discord_token=DISCORD_TOKEN)))
    assert no_intent.status is Status.FAIL
    assert "Message Content intent is off" in no_intent.detail


async def test_discord_unset_or_unreachable(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    assert only(await doctor.check_discord(make())).line == "skip  discord: DISCORD_TOKEN not set"
    monkeypatch.setattr(discord.http.Route, "BASE", closed_port_url(path="/api/v10"))
    down = only(await doctor.check_discord(make(discord_token=DISCORD_TOKEN)))
    assert down.status is Status.FAIL and "cannot reach Discord's API" in down.detail


# -- all together ---------------------------------------------------------------------------------


async def test_in_a_fixed_order_and_with_no_backend_a_failure(make: Make, redis_server) -> None:
    seen: list[str] = []
    checks = await doctor.diagnose(
        make(redis_url=redis_server.url), report=lambda c: seen.append(c.name)
    )
    order = ["redis", "gpu", "model", "openai", "backend", "slack", "discord"]
    assert [c.name for c in checks] == seen == order
    assert [c.status for c in checks].count(Status.FAIL) == 1
    assert checks[4].line == "FAIL  backend: no backend can answer: set LLM_MODEL or OPENAI_API_KEY"
    assert doctor.exit_status(checks) == 1


async def test_no_secret_value_reaches_any_line(
    make: Make,
    fake_openai: FakeOpenAI,
    fake_slack: FakeSlack,
    fake_discord: FakeDiscord,
) -> None:
    # Every secret is wrong, so each check has a reason to talk about it.
    fake_openai.required_api_key = "sk-the-right-one-0123456789"
    settings = make(
        redis_url=closed_redis_url(f"user:{REDIS_PASSWORD}"),
        openai_api_key=OPENAI_KEY,
        openai_base_url=fake_openai.base_url,
        llm_api_key="llm-key-0123456789-secret",
        slack_bot_token="xoxb-9999-wrong-secret-token",
        slack_signing_secret="signing-secret-0123456789",
        slack_app_token="xapp-1-wrong-secret-app-token",
        slack_api_url=fake_slack.url,
        discord_token="MTIz.wrong-secret.discord-token",
    )
    checks = await doctor.diagnose(settings)
    text = "\n".join(c.line for c in checks)
    assert [c.name for c in checks if c.status is Status.FAIL] == [
        "redis",
        "openai",
        "backend",
        "slack",
        "slack-mode",
        "discord",
    ]
    for secret in settings.secret_values():
        assert secret not in text
    assert REDIS_PASSWORD in settings.secret_values()
