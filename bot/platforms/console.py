"""`supportbot chat`: a terminal conversation through the same SupportService as the platforms.

Reads lines from stdin until EOF (so it works piped); replies go to stdout, logs to stderr.
Replies are plain text: the service writes Slack-style markup (`*bold*`, `•` bullets, `<url|text>`
links) that a terminal would show literally. stdin is read on a daemon thread, so Ctrl-C at the
prompt ends the program at once instead of waiting for a line that never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import re
import sys
import threading
from typing import TextIO

from bot.conversation import ConversationKey
from bot.knowledge.cite import Sources
from bot.llm.base import Delta
from bot.sampling import COMMAND
from bot.service import Failure, SupportService, User

_BOLD = re.compile(r"(?<![\w*])\*(\S(?:[^*\n]*\S)?)\*(?![\w*])")
_LINK = re.compile(r"<(https?://[^|>\s]+)\|([^>\n]+)>")
_BARE_LINK = re.compile(r"<(https?://[^|>\s]+)>")


def plain(text: str) -> str:
    """Slack-style markup as a terminal should show it."""
    text = _BOLD.sub(r"\1", text)
    text = _LINK.sub(r"\2 (\1)", text)
    text = _BARE_LINK.sub(r"\1", text)
    return text.replace("• ", "- ")


def _readline(stdin: TextIO) -> asyncio.Future[str]:
    """One line of stdin, read on a daemon thread: a pending read never holds up the exit."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def deliver(text: str | None, error: BaseException | None) -> None:
        if line.done():
            return
        if error is not None:
            line.set_exception(error)
        else:
            line.set_result(text or "")

    def read() -> None:
        text: str | None = None
        error: BaseException | None = None
        try:
            text = stdin.readline()
        except Exception as exc:  # a closed or broken stdin ends the conversation
            error = exc
        # RuntimeError: the loop closed while we waited, so nobody wants the line.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, text, error)

    threading.Thread(target=read, name="console-stdin", daemon=True).start()
    return line


def _console_user() -> User:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        name = "operator"
    # Whoever holds the terminal runs the bot: they may change its settings.
    return User(id=f"console:{name}", name=name, can_configure=True)


async def run_console(
    service: SupportService,
    channel: str,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    key = ConversationKey("console", "local", channel)
    user = _console_user()
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = await _readline(stdin)
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.split(maxsplit=1)[0].lower() == COMMAND:
            stdout.write(plain(await service.settings(key, user, text[len(COMMAND) :])) + "\n")
            stdout.flush()
            continue
        wrote = False  # a failure after text starts on a line of its own, never on a blank one
        async for event in service.ask(key, user, text):
            if isinstance(event, Delta):
                stdout.write(event.text)
                wrote = wrote or bool(event.text)
            elif isinstance(event, Failure):
                stdout.write(("\n" if wrote else "") + plain(event.message))
            elif isinstance(event, Sources):
                stdout.write("\n\n" + event.plain())
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
