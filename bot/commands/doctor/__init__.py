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
import logging
import os
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TextIO

from bot.commands.doctor.checks import Check, Report, Status, exit_status, mask_url, reason, summary
from bot.commands.doctor.model_check import check_backend, check_gpu, check_model
from bot.commands.doctor.openai_check import check_openai
from bot.commands.doctor.platform_check import check_discord, check_slack
from bot.commands.doctor.redis_check import check_redis
from bot.config import ConfigError, Settings, load_settings
from bot.ops.logging import RedactingFilter, setup_logging

__all__ = [
    "Check",
    "Status",
    "check_backend",
    "check_discord",
    "check_gpu",
    "check_model",
    "check_openai",
    "check_redis",
    "check_slack",
    "diagnose",
    "exit_status",
    "mask_url",
    "run_doctor",
    "summary",
]


def run_doctor(*, download: bool = False, verbose: bool = False, out: TextIO | None = None) -> int:
    """`supportbot doctor`: print one line per check; the exit status for scripts."""
    out = out or sys.stdout
    try:
        settings = load_settings()
        if settings.discord_shard_ids is not None:
            from bot.platforms.discord.client import shard_config

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

    import bot.platforms.slack.app  # noqa: F401


def _start(name: str, check: Awaitable[list[Check]]) -> asyncio.Task[list[Check]]:
    return asyncio.ensure_future(_guarded(name, check))


async def _guarded(name: str, check: Awaitable[list[Check]]) -> list[Check]:
    try:
        return await check
    except Exception as exc:  # one check's unforeseen failure must not hide the others
        return [Check(name, Status.FAIL, f"the check itself failed: {reason(exc)}")]
