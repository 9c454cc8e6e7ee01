"""doctor: OpenAI and OpenAI-compatible servers (GPT, LLM_BASE_URL)."""

from __future__ import annotations

import asyncio

from bot.commands.doctor.checks import (
    NETWORK_TIMEOUT_S,
    Check,
    Status,
    fail,
    mask_url,
    ok,
    reason,
    skip,
)
from bot.config import Settings


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
    return Status.FAIL, reason(exc)


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
        return fail(name, f"{where} does not list {variable}={wanted} (it lists: {listed})")
    return ok(name, f"{where} serves {wanted}")


async def check_model_server(settings: Settings) -> list[Check]:
    from bot.llm.openai_chat import PLACEHOLDER_KEY

    key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else PLACEHOLDER_KEY
    assert settings.llm_base_url is not None
    return await _check_models_endpoint(
        "model", settings.llm_base_url, key, "LLM_API_KEY", ("LLM_MODEL", settings.llm_model)
    )


async def check_openai(settings: Settings) -> list[Check]:
    if settings.openai_api_key is None:
        return skip("openai", "OPENAI_API_KEY not set: no GPT fallback")
    checks = await _check_models_endpoint(
        "openai",
        settings.openai_base_url,
        settings.openai_api_key.get_secret_value(),
        "OPENAI_API_KEY",
        ("OPENAI_MODEL", settings.openai_model),
    )
    if checks[0].status is Status.OK:
        return ok("openai", f"key accepted; {checks[0].detail}")
    return checks
