"""What every doctor check shares: the Check line, its Status, timeouts, and helpers that
run blocking work on a daemon thread and shorten reasons."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

NETWORK_TIMEOUT_S = 10.0
MAX_DETAIL = 300

T = TypeVar("T")


class Status(Enum):
    OK = "ok"
    WARN = "warn"
    SKIP = "skip"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    # The check gave up on work still running on a non-daemon thread (a model load that timed
    # out); the command must then exit without waiting for it.
    abandoned: bool = False

    @property
    def line(self) -> str:
        return f"{self.status.value:<6}{self.name}: {self.detail}"


Report = Callable[[Check], None]


def exit_status(checks: Iterable[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def summary(checks: list[Check]) -> str:
    counts = {s: sum(1 for c in checks if c.status is s) for s in Status}
    parts = ", ".join(f"{counts[s]} {s.value}" for s in Status)
    return f"doctor: {parts}; exit {exit_status(checks)}"


def mask_url(url: str) -> str:
    """The URL with its password (in the authority or a `password=` query) shown as ****."""
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        password = parts.password
    except ValueError:
        return "(a URL that cannot be parsed)"
    in_query = any(k.lower() == "password" for k, _ in pairs)
    if password is None and not in_query:
        return url  # as written: urlunsplit would also drop the "//" of "unix:///path"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:****@{netloc.rpartition('@')[2]}"
    masked = [(k, "****" if k.lower() == "password" else v) for k, v in pairs]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(masked, safe="/*")))


def reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


async def in_thread(work: Callable[[], T], timeout_s: float) -> T:
    """`work()` on a daemon thread, bounded by `timeout_s`.

    Unlike asyncio.to_thread's pool, a call that never returns (a hung driver, a dead mount) can
    neither hang doctor nor hold up its exit.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if done.done():  # the caller has timed out already
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast(T, value))

    def run() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = work()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="doctor-check", daemon=True).start()
    return await asyncio.wait_for(done, timeout_s)


def ok(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.OK, detail)]


def fail(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.FAIL, detail)]


def skip(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.SKIP, detail)]


def warn(name: str, detail: str) -> list[Check]:
    return [Check(name, Status.WARN, detail)]
