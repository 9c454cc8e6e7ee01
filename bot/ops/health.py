"""`GET /healthz`, `/readyz` and `/metrics` as aiohttp routes, for every service command.

Slack's HTTP mode mounts them beside `POST /slack/events` on the same aiohttp app; Socket Mode
and Discord serve them from a small app of their own on $PORT. Every server starts through
`serve()`, whose timeouts keep slow or idle clients from holding connections or shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.ops import metrics

# Returns (ready, details): details are short strings per check, e.g. {"redis": "ok"}.
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]


# A connection that has not sent a whole request within this long is closed (idle keep-alive
# connections, and slowloris clients trickling headers). Slack opens a connection per request.
IDLE_TIMEOUT_S = 15.0
# On shutdown, how long requests still being handled may take before their connections close
# (our handlers answer at once: Slack's events are acknowledged before listeners run).
SERVER_SHUTDOWN_S = 2.0


async def serve(app: web.Application, port: int, host: str) -> web.AppRunner:
    """Start `app` on host:port with the timeouts above; stop it with `await runner.cleanup()`."""
    runner = web.AppRunner(
        app, access_log=None, keepalive_timeout=IDLE_TIMEOUT_S, shutdown_timeout=SERVER_SHUTDOWN_S
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


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
    return await serve(app, port, host)
