"""`supportbot chat`: a terminal conversation through the same SupportService as the platforms.

Reads lines from stdin until EOF (so it works piped); replies go to stdout, logs to stderr.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from typing import TextIO

from bot.conversation import ConversationKey
from bot.knowledge.cite import Sources
from bot.llm.base import Delta
from bot.sampling import COMMAND
from bot.service import Failure, SupportService, User


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
    loop = asyncio.get_running_loop()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = await loop.run_in_executor(None, stdin.readline)
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.split(maxsplit=1)[0].lower() == COMMAND:
            stdout.write(await service.settings(key, user, text[len(COMMAND) :]) + "\n")
            stdout.flush()
            continue
        async for event in service.ask(key, user, text):
            if isinstance(event, Delta):
                stdout.write(event.text)
            elif isinstance(event, Failure):
                stdout.write(("\n" if event.error_id else "") + event.message)
            elif isinstance(event, Sources):
                stdout.write("\n\n" + event.plain())
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
