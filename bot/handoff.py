"""Hand-off to a human: the conversation summarised by the same model chain, and what the bot
says while a human has a thread. Pure of platforms and Redis (the service calls it)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from contextlib import aclosing
from dataclasses import dataclass

from bot.conversation import Message
from bot.llm.base import Delta
from bot.ports import Models
from bot.sampling import SamplingSettings

logger = logging.getLogger(__name__)

HANDED_OFF_NOTE = (
    "A person from the team has this conversation now, so I'm staying out of it "
    "until they mark it resolved."
)
HANDOFF_GONE = (
    "That answer is no longer on record, so I can't hand this conversation off from it. "
    "Nothing was changed; mention the team directly."
)
SUMMARY_INSTRUCTION = (
    "Summarise this support conversation for a colleague who takes it over: in at most three "
    "short sentences, what the user needs and what has been answered so far. "
    "Reply with the summary only, in the conversation's language."
)
SUMMARY_TOKENS = 200
TRANSCRIPT_CHARS = 6_000  # the newest part of a long conversation; the prompt stays small
SUMMARY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Handoff:
    """What the hand-off message says: who asked, the question, and a summary if one came."""

    question: str
    asker: str
    summary: str | None


async def summarise(
    llm: Models, history: list[Message], sampling: SamplingSettings,
    timeout_s: float = SUMMARY_TIMEOUT_S,
) -> str | None:  # fmt: skip
    """A short summary, or None when no model could write one (the hand-off goes out anyway)."""
    transcript = "\n".join(f"{m.role}: {m.content}" for m in history)[-TRANSCRIPT_CHARS:]
    if not transcript:
        return None
    sampling = dataclasses.replace(
        sampling, max_new_tokens=min(SUMMARY_TOKENS, sampling.max_new_tokens)
    )
    parts: list[str] = []
    try:
        prompt = await asyncio.to_thread(
            llm.encode,
            [
                {"role": "system", "content": SUMMARY_INSTRUCTION},
                {"role": "user", "content": transcript},
            ],
        )
        async with asyncio.timeout(timeout_s):
            async with aclosing(llm.stream(prompt, sampling)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, Delta):
                        parts.append(event.text)
    except Exception as exc:  # any model failure: the hand-off must still go out
        logger.warning("no summary for a hand-off (%s: %s)", type(exc).__name__, exc)
        return None
    return "".join(parts).strip() or None
