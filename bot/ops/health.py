"""`GET /healthz`, `/readyz` and `/metrics` as aiohttp routes, for every service command.

Slack's HTTP mode mounts them beside `POST /slack/events` on the same aiohttp app; Socket Mode
and Discord serve them from a small app of their own on $PORT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.ops import metrics

# Returns (ready, details): details are short strings per check, e.g. {"redis": "ok"}.
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]


def add_health_routes(app: web.Application, readiness: Readiness) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        ready, details = await readiness()
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": details},
            status=200 if ready else 503,
        )

    async def metrics_view(_: web.Request) -> web.Response:
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)


async def serve_health(port: int, readiness: Readiness, host: str = "0.0.0.0") -> web.AppRunner:  # noqa: S104 - probes come from outside the container
    """Start a server with only the health routes; stop it with `await runner.cleanup()`."""
    app = web.Application()
    add_health_routes(app, readiness)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
