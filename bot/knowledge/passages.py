"""Passages as values, and the splitter that cuts a document's Markdown into them.

Pure: no Redis, no model. A passage is a piece of one source small enough to embed (the size is
counted by the embedding model's own tokenizer, handed in as `count`), cut at headings first and
then at paragraphs, remembering the source's title and link and the headings above it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

Counter = Callable[[Sequence[str]], list[int]]  # token counts of several texts at once

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s+|\n")


@dataclass(frozen=True, slots=True)
class Passage:
    source: str  # the source's id: a resolved file path or a URL
    index: int  # position within the source
    title: str
    link: str  # URL or file path; what a reader opens
    heading: str  # "Returns › Refunds": the headings above the passage
    text: str
    tokens: tuple[str, ...] = field(default=(), compare=False)  # keyword-index terms

    @property
    def id(self) -> str:
        return f"{self.source}#{self.index}"

    def encode(self) -> str:
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        return json.dumps(data, ensure_ascii=False)

    @staticmethod
    def decode(raw: bytes | str) -> Passage:
        data = json.loads(raw)
        data["tokens"] = tuple(data.get("tokens", ()))
        return Passage(**data)


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved passage: its fused score, and what each index said of it."""

    passage: Passage
    score: float  # reciprocal-rank fusion
    keyword: float | None  # BM25 score, None when not among the keyword candidates
    similarity: float | None  # cosine similarity, None without semantic search


def split_markdown(markdown: str, *, target: int, count: Counter) -> list[tuple[str, str]]:
    """(heading path, text) pieces of at most `target` tokens each (a single over-long word
    excepted), cut at headings, then paragraphs, then sentences, then words."""
    sections: list[tuple[str, list[str]]] = []
    path: list[tuple[int, str]] = []
    paragraph: list[str] = []
    blocks: list[str] = []

    def close_paragraph() -> None:
        if paragraph:
            blocks.append("\n".join(paragraph).strip())
            paragraph.clear()

    def close_section() -> None:
        close_paragraph()
        if any(blocks):
            sections.append((" › ".join(title for _, title in path), [b for b in blocks if b]))
        blocks.clear()

    in_code = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        match = None if in_code else _HEADING.match(line)
        if match:
            close_section()
            level = len(match.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, match.group(2))]
        elif not line.strip() and not in_code:
            close_paragraph()
        else:
            paragraph.append(line)
    close_section()

    pieces: list[tuple[str, str]] = []
    for heading, paragraphs in sections:
        units = _units(paragraphs, target, count)
        sizes = count(units)
        chunk: list[str] = []
        size = 0
        for unit, n in zip(units, sizes, strict=True):
            if chunk and size + n > target:
                pieces.append((heading, "\n\n".join(chunk)))
                chunk, size = [], 0
            chunk.append(unit)
            size += n
        if chunk:
            pieces.append((heading, "\n\n".join(chunk)))
    return pieces


def _units(paragraphs: list[str], target: int, count: Counter) -> list[str]:
    """Paragraphs, with any longer than `target` cut into sentences, then into words."""
    units: list[str] = []
    for paragraph, n in zip(paragraphs, count(paragraphs), strict=True):
        if n <= target:
            units.append(paragraph)
            continue
        sentences = [s for s in _SENTENCE.split(paragraph) if s.strip()]
        for sentence, m in zip(sentences, count(sentences), strict=True):
            if m <= target:
                units.append(sentence)
                continue
            units.extend(_halves(sentence, target, count))
    return units


def _halves(text: str, target: int, count: Counter) -> list[str]:
    """`text` cut at word boundaries into pieces of at most `target` tokens (bisection)."""
    words = text.split()
    if len(words) <= 1 or count([text])[0] <= target:
        return [text]
    middle = len(words) // 2
    return [
        *_halves(" ".join(words[:middle]), target, count),
        *_halves(" ".join(words[middle:]), target, count),
    ]


def word_count(texts: Sequence[str]) -> list[int]:
    """A tokenizer-free count (KB_EMBED_MODEL=none): words and punctuation, and each Hangul or
    CJK syllable a third of a token, about what subword tokenizers make of them."""
    return [
        len(re.findall(r"[^\W\u3131-\u9fff\uac00-\ud7a3]+|[^\w\s]", text))
        + len(re.findall(r"[\u3131-\u9fff\uac00-\ud7a3]", text)) // 2
        for text in texts
    ]
