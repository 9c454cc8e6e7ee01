"""The whole-suite secrets scan: no log line the suite produces may carry a token, a signing secret
or an API key (tests/support/secrets.py has the registry; tests/conftest.py wires the hooks).

What is scanned:
- every log record created in the test process, from any logger and any thread, as its text
  *before* any filter or handler sees it: the formatted message, the exception's traceback and
  the stack, taken by a log-record factory. Before redaction on purpose: in-process tests run
  the bot's code without the bot's handler (the CLI installs that, with the secrets of its own
  configuration), and scanning after a filter that knows the registry would only prove that the
  filter replaces what it is told to replace. So the bar is stricter than production: the code
  must not hand a secret to logging at all; redaction (bot/ops/logging.py) is the second line;
- the output (stdout and stderr) of every subprocess that the suite runs through
  `Popen.communicate` (which `subprocess.run` uses): that is `supportbot chat/slack/discord/
  doctor` as operators run them, logging through the bot's own handler and redaction, configured
  only with what its Settings call secret, so a secret that the bot does not know is one shows;
- what tests print to stdout and stderr, as pytest captured it.
Levels: the root logger is at INFO for the whole suite (re-set before each test, in case one
raised it), the level the deployed bot logs at (setup_logging); unlike the deployed bot, the
chatty libraries (httpx, openai, ...) are not quietened to WARNING, so their INFO lines are
scanned too, and a test that turns DEBUG on for itself gets its DEBUG lines scanned. DEBUG for
the whole suite would scan ten times the records, all library chatter the bot never writes, and
slow the load tests by a fifth.
Not scanned: output a test reads from a pipe itself instead of communicate(), and records below
the level of their logger.

Tests that log a secret on purpose (to check the redaction filter) carry the marker
`logs_secrets_on_purpose`; what happens while they run is not scanned.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support import secrets

MARKER = "logs_secrets_on_purpose"


@dataclass
class Leak:
    test: str  # node id, or "-" outside a test
    source: str  # e.g. "log bot.service ERROR", "subprocess stderr: python -m bot chat"
    text: str  # with the secrets hidden


@dataclass
class SecretScan:
    leaks: list[Leak] = field(default_factory=list)
    records: int = 0
    outputs: int = 0
    test: str = "-"
    exempt: bool = False
    _pattern: re.Pattern[str] | None = None
    _pattern_size: int = -1
    _installed: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- what is found ----------------------------------------------------------------------

    def _matcher(self) -> re.Pattern[str]:
        registered = secrets.registered()
        if self._pattern is None or self._pattern_size != len(registered):
            values = sorted(registered, key=len, reverse=True)
            alternatives = [re.escape(v) for v in values] + [secrets.TOKEN_SHAPES.pattern]
            self._pattern = re.compile("|".join(alternatives))
            self._pattern_size = len(registered)
        return self._pattern

    def check(self, source: str, text: str) -> None:
        if self.exempt or not text:
            return
        if self._matcher().search(text) is None:
            return
        lines = [line for line in text.splitlines() if secrets.find(line)] or [text]
        with self._lock:
            for line in lines:
                self.leaks.append(Leak(self.test, source, secrets.hide(line)[:500]))

    def check_record(self, record: logging.LogRecord) -> None:
        if self.exempt:
            return
        self.records += 1
        try:
            text = record.getMessage()
        except Exception:  # a bad format string: logging would report it, we scan the parts
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        if record.stack_info:
            text += "\n" + record.stack_info
        self.check(f"log {record.name} {record.levelname}", text)

    def check_output(self, args: Any, *streams: str | bytes | None) -> None:
        if self.exempt:
            return
        self.outputs += 1
        command = " ".join(str(a) for a in args) if isinstance(args, list | tuple) else str(args)
        command = secrets.hide(command)[:80]  # hidden before it is cut: no half secrets
        for name, data in zip(("stdout", "stderr"), streams, strict=False):
            if isinstance(data, bytes):
                data = data.decode("utf-8", "replace")
            self.check(f"subprocess {name}: {command}", data or "")

    # -- installing and removing the taps ----------------------------------------------------

    def install(self) -> None:
        """Tap log-record creation and subprocess output; the root logger to INFO."""
        previous_factory = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous_factory(*args, **kwargs)
            self.check_record(record)
            return record

        logging.setLogRecordFactory(factory)
        self._installed.append(lambda: logging.setLogRecordFactory(previous_factory))

        communicate = subprocess.Popen.communicate

        def scanning_communicate(
            popen: subprocess.Popen[Any], *args: Any, **kwargs: Any
        ) -> tuple[Any, Any]:
            out, err = communicate(popen, *args, **kwargs)
            self.check_output(popen.args, out, err)
            return out, err

        subprocess.Popen.communicate = scanning_communicate  # type: ignore[method-assign,assignment]
        self._installed.append(lambda: setattr(subprocess.Popen, "communicate", communicate))

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.INFO)
        self._installed.append(lambda: root.setLevel(level))

    def uninstall(self) -> None:
        while self._installed:
            self._installed.pop()()

    def begin(self, test: str, exempt: bool) -> None:
        self.test, self.exempt = test, exempt
        # A test that raised the root logger's level (setup_logging(level=CRITICAL) in-process)
        # must not blind the scan, or caplog, for the tests after it; one that lowered it to
        # DEBUG must not slow down the rest.
        logging.getLogger().setLevel(logging.INFO)

    def end(self) -> None:
        self.test, self.exempt = "-", False

    # -- the verdict -------------------------------------------------------------------------

    def report(self) -> Iterable[str]:
        yield (
            f"secrets scan: {self.records} log records, {self.outputs} subprocess outputs, "
            f"{len(secrets.registered())} registered secrets + token shapes: "
            f"{len(self.leaks)} leak(s)"
        )
        yield "  registered: " + ", ".join(sorted(secrets.registered().values()))
        for leak in self.leaks[:50]:
            yield f"  LEAK in {leak.test} ({leak.source}): {leak.text}"
        if len(self.leaks) > 50:
            yield f"  ... and {len(self.leaks) - 50} more"
