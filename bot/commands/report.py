"""`supportbot report [--since DURATION] [--format text|json|csv]`: the support picture from
what the bot kept in Redis (REPORT_RETENTION_DAYS), on stdout. Needs Redis (the embedded one when
REDIS_URL is unset), never a model."""

from __future__ import annotations

import asyncio
import sys
import time

from bot.commands.runtime import open_redis
from bot.config import Settings
from bot.reporting import FORMATS, build_report
from bot.store import RedisStore


async def run(settings: Settings, since_s: float, fmt: str) -> int:
    redis, embedded = await open_redis(settings)
    try:
        store = RedisStore(
            redis,
            defaults=settings.default_sampling,
            max_new_tokens_limit=settings.llm_max_new_tokens_limit,
        )
        now = time.time()
        questions, answers = await store.report_data(now - since_s)
        report = build_report(questions, answers, since=now - since_s, until=now)
        sys.stdout.write(FORMATS[fmt](report))
        return 0
    finally:
        await redis.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
