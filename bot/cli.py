"""The `supportbot` command (also `python -m bot`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from bot.commands.runtime import StartupError
from bot.config import ConfigError, load_settings
from bot.ops.logging import setup_logging
from bot.ops.redis_server import RedisServerError
from bot.sampling import check_collection

logger = logging.getLogger("bot")

_CHAT_HELP = """\
what it answers with:
  LLM_MODEL       hub id or checkpoint directory of the local model (default:
                  LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct, downloaded once, ~4.8 GB);
                  `none` for no local model
  LLM_BASE_URL    an OpenAI-compatible server serving LLM_MODEL instead
  OPENAI_API_KEY  GPT, the fallback (or the only model with LLM_MODEL=none)

in the conversation:
  type a question and Enter; /llm-settings shows or changes sampling
  (e.g. `/llm-settings temperature 0.3`); Ctrl-D (or Ctrl-C) ends it.
  Works piped too: printf 'hello\\n' | supportbot chat

`supportbot doctor` checks the configuration and says what is missing.
"""

# Each service command exposes `async def run(settings: Settings) -> int`.
_SERVICES = {"slack": "bot.commands.slack", "discord": "bot.commands.discord"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supportbot",
        description="A support chatbot for Slack and Discord, answering with EXAONE 3.5 or GPT.",
    )
    parser.add_argument("--version", action="version", version=f"supportbot {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = commands.add_parser(
        "chat",
        help="talk to the bot in this terminal (reads stdin)",
        description="A conversation with the bot in this terminal, through the same service as "
        "Slack and Discord. Replies go to stdout, logs to stderr.",
        epilog=_CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--channel", default="terminal", help="conversation name (default: terminal)")
    commands.add_parser("slack", help="run the Slack app")
    commands.add_parser("discord", help="run the Discord bot")
    doctor = commands.add_parser("doctor", help="check configuration and dependencies")
    doctor.add_argument(
        "--download",
        action="store_true",
        help="download LLM_MODEL into the Hugging Face cache when it is not there, then load it",
    )
    doctor.add_argument("--verbose", action="store_true", help="also show the bot's logs (stderr)")
    kb = commands.add_parser("kb", help="the knowledge base: add, list, remove, search")
    actions = kb.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, arg, nargs, text in (
        ("add", "SOURCE", "+", "add files, folders, URLs or sitemaps"),
        ("list", None, None, "list the sources"),
        ("remove", "SOURCE", "+", "remove sources and their passages"),
        ("search", "QUERY", "+", "show the passages a question would retrieve"),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("--collection", help="collection (default: KB_COLLECTION)")
        if arg:
            sub.add_argument("args", metavar=arg, nargs=nargs)
    report = commands.add_parser(
        "report",
        help="the support picture per platform and channel",
        description="Questions, answers by backend, 👍/👎, hand-offs, questions answered without "
        "a passage, first-token latency p50/p95, and the questions that most need better "
        "documents; from what is kept in Redis (REPORT_RETENTION_DAYS).",
    )
    report.add_argument(
        "--since", default="7d", type=_duration, help="period: 30m, 12h, 7d, 2w (default: 7d)"
    )
    report.add_argument("--format", default="text", choices=("text", "json", "csv"))
    return parser


def _duration(text: str) -> float:
    from bot.reporting import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version() -> str:
    try:
        return version("supportbot")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`supportbot doctor | head -1`): not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as the shell reports it


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        # Imported on demand; doctor reports an invalid configuration as one of its own lines.
        from bot.commands.doctor import run_doctor

        return run_doctor(download=args.download, verbose=args.verbose)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"supportbot: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_format, settings.secret_values())
    try:
        if args.command == "chat":
            from bot.commands import chat

            return asyncio.run(chat.run(settings, args.channel))
        if args.command == "kb":
            from bot.commands import kb

            if args.collection is not None:
                try:
                    check_collection(args.collection)
                except ValueError as exc:
                    print(f"supportbot: --collection {exc}", file=sys.stderr)
                    return 2
            return asyncio.run(
                kb.run(settings, args.action, getattr(args, "args", []), args.collection)
            )
        if args.command == "report":
            from bot.commands import report

            return asyncio.run(report.run(settings, args.since, args.format))
        # slack or discord (argparse allows nothing else), imported on demand: `chat` never
        # loads slack-bolt or discord.py.
        module = importlib.import_module(_SERVICES[args.command])
        return int(asyncio.run(module.run(settings)))
    except RedisServerError as exc:
        print(f"supportbot: {exc}", file=sys.stderr)
        return 1
    except StartupError as exc:  # 2: invalid configuration, 1: a dependency unreachable
        print(f"supportbot: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # e.g. REDIS_URL unreachable
        print(f"supportbot: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
