"""What an answer grounded in passages ends with: the sources it cites, as links each platform
renders its own way, and the strict-mode reply when no passage is relevant. Pure values."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bot.knowledge.passages import Passage

NO_DOCUMENTED_ANSWER = (
    "I couldn't find this in our documents, so I won't guess an answer. Would you like a human "
    "to help? Use “Ask a human”, or mention someone from the team here."
)
_CITATION = re.compile(r"\[(\d{1,3})\]")
_URL = re.compile(r"^https?://", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Source:
    title: str
    link: str

    @property
    def is_url(self) -> bool:
        return bool(_URL.match(self.link))


@dataclass(frozen=True, slots=True)
class Sources:
    """The stream event after an answer's text: the sources it cites, numbered as in the
    answer. Platforms render it (`markdown()` for Slack and Discord, `plain()` elsewhere)."""

    items: tuple[tuple[int, Source], ...]

    def markdown(self) -> str:
        lines = ["**Sources**"]
        for n, source in self.items:
            title = re.sub(r"[\[\]]", "", source.title)
            shown = f"[{title}]({source.link})" if source.is_url else f"{title} ({source.link})"
            lines.append(f"[{n}] {shown}")
        return "\n".join(lines)

    def plain(self) -> str:
        lines = ["Sources:"]
        lines += [f"[{n}] {source.title} — {source.link}" for n, source in self.items]
        return "\n".join(lines)


def cited_sources(answer: str, passages: Sequence[Passage]) -> Sources | None:
    """The sources of the passages `answer` cites as [n]; when it cites none, every passage it
    was given (it answered from them). One line per link, at its first number."""
    numbers = sorted({int(m) for m in _CITATION.findall(answer) if 1 <= int(m) <= len(passages)})
    if not numbers:
        numbers = list(range(1, len(passages) + 1))
    seen: set[str] = set()
    items = []
    for n in numbers:
        passage = passages[n - 1]
        if passage.link not in seen:
            seen.add(passage.link)
            items.append((n, Source(passage.title, passage.link)))
    return Sources(tuple(items)) if items else None
