"""Splitting long answers into messages that each fit a platform's limit.

Splits fall at paragraph boundaries, or between code blocks, never inside a code block: a code
block longer than the limit is cut at line boundaries and each part is closed and re-opened with
its own fence (language kept), so every message renders on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FENCE = re.compile(r"^(\s*)(```+|~~~+)(.*)$")


@dataclass(frozen=True, slots=True)
class _Block:
    text: str
    fence: str | None = None  # the opening fence line of a code block, e.g. "```python"
    closer: str = ""  # the fence characters that close it, e.g. "```"


def _blocks(text: str) -> list[_Block]:
    """Paragraphs (with the blank lines after them) and whole code blocks, in order."""
    blocks: list[_Block] = []
    lines = text.splitlines(keepends=True)
    i = 0
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(_Block("".join(paragraph)))
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        match = _FENCE.match(line.rstrip("\n"))
        if match:
            flush()
            marker = match.group(2)
            body = [line]
            i += 1
            while i < len(lines):
                body.append(lines[i])
                closing = lines[i].strip()
                i += 1
                if closing.startswith(marker[0] * len(marker)) and not closing.strip(marker[0]):
                    break
            while i < len(lines) and not lines[i].strip():  # blank lines belong before a split
                body.append(lines[i])
                i += 1
            blocks.append(_Block("".join(body), line.rstrip("\n"), marker))
            continue
        paragraph.append(line)
        i += 1
        if not line.strip():
            # A blank line ends a paragraph (more blank lines join it).
            while i < len(lines) and not lines[i].strip():
                paragraph.append(lines[i])
                i += 1
            flush()
    flush()
    return blocks


def _cut_text(text: str, limit: int) -> list[str]:
    """Cut prose at the last newline, else sentence end, else space, else hard, within limit."""
    parts: list[str] = []
    while len(text) > limit:
        window = text[:limit]
        cut = window.rfind("\n") + 1
        if cut <= limit // 4:
            sentence = max(window.rfind(". "), window.rfind("? "), window.rfind("! "))
            cut = sentence + 2 if sentence > limit // 4 else 0
        if cut <= limit // 4:
            cut = window.rfind(" ") + 1
        if cut <= limit // 4:
            cut = limit
        parts.append(text[:cut])
        text = text[cut:]
    if text:
        parts.append(text)
    return parts


def _cut_code(block: _Block, limit: int) -> list[str]:
    """Cut a code block at line boundaries; each part gets its own opening and closing fence."""
    assert block.fence is not None
    opener = block.fence.strip() + "\n"
    closer = block.closer + "\n"
    lines = block.text.splitlines(keepends=True)[1:]
    # Drop the original closing fence (and trailing blanks); every part gets its own.
    while lines and (not lines[-1].strip() or lines[-1].strip() == block.closer):
        last = lines.pop().strip()
        if last == block.closer:
            break
    room = limit - len(opener) - len(closer)
    if room < 1:
        return _cut_text(block.text, limit)
    parts: list[str] = []
    current = ""
    for line in lines:
        line = line if line.endswith("\n") else line + "\n"
        # A line longer than a part is cut hard; each piece ends its own line, so the closing
        # fence after it stays on a line of its own.
        pieces = [p if p.endswith("\n") else p + "\n" for p in _cut_text(line, room - 1)]
        for piece in pieces if len(line) > room else [line]:
            if current and len(current) + len(piece) > room:
                parts.append(opener + current + closer)
                current = ""
            current += piece
    if current or not parts:
        parts.append(opener + current + closer)
    return parts


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into messages of at most `limit` characters, at safe boundaries."""
    if limit < 16:
        raise ValueError("limit must be at least 16 characters")
    if len(text) <= limit:
        return [text] if text else []
    messages: list[str] = []
    current = ""
    for block in _blocks(text):
        if len(block.text) > limit:
            pieces = _cut_code(block, limit) if block.fence else _cut_text(block.text, limit)
        else:
            pieces = [block.text]
        for piece in pieces:
            if current and len(current) + len(piece) > limit:
                messages.append(current)
                current = ""
            current += piece
    if current:
        messages.append(current)
    # Trailing whitespace at a split is noise on every platform.
    return [m.rstrip() for m in messages if m.strip()]
