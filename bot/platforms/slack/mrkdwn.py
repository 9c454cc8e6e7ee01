"""Markdown (what the models write) → Slack mrkdwn (what `chat.postMessage` text renders).

Parsing is markdown-it-py's CommonMark parser; this module only renders its syntax tree the way
Slack reads text:

- `**bold**` → `*bold*`, `*italic*`/`_italic_` → `_italic_`, `~~strike~~` → `~strike~`,
  headings → bold lines, lists → `•`/`1.` lines, links → `<url|text>`, code kept as code.
- `&`, `<` and `>` are escaped everywhere, so model output can never form `<!channel>`,
  `<@U…>` or a link of its own.
- Slack only honours `*`, `_` and `~` at word boundaries, which Korean, Japanese and Chinese text
  rarely has (`**주문번호**를` stays literal). Where a marker touches a letter or digit outside
  it, a zero-width space is put between them; Slack then renders the style and readers see
  nothing extra.
"""

from __future__ import annotations

import re
import unicodedata

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

_MD = MarkdownIt("commonmark", {"html": False}).enable("strikethrough")

ZWSP = "\u200b"
# Placeholders for "maybe a zero-width space here", outside an opening / closing marker. They
# are control characters, scrubbed from the input first, so they cannot collide with text.
_OPEN = "\x01"
_CLOSE = "\x02"
_WORD_BEFORE_OPEN = re.compile(r"(?<=\w)" + _OPEN)
_WORD_AFTER_CLOSE = re.compile(_CLOSE + r"(?=\w)")

_STYLE = {"strong": "*", "em": "_", "s": "~"}
_SPECIAL = re.compile(r"<(?=[!@#])")
_SAFE_LINK = re.compile(r"^(https?|mailto):", re.IGNORECASE)
_INDENT = "    "


def to_mrkdwn(markdown: str) -> str:
    """Render `markdown` as Slack mrkdwn text."""
    clean = "".join(
        ch for ch in markdown if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs")
    )
    root = SyntaxTreeNode(_MD.parse(clean))
    text = _blocks(root.children)
    text = _WORD_BEFORE_OPEN.sub(ZWSP, text)
    text = _WORD_AFTER_CLOSE.sub(ZWSP, text)
    return text.replace(_OPEN, "").replace(_CLOSE, "")


def defuse(markdown: str) -> str:
    """For text Slack renders as markdown itself (streams): break `<!here>`, `<@U…>` and
    `<#C…>` with a zero-width space so model output cannot notify anyone. Idempotent, and a
    prefix of the text stays a prefix of the result (streams append to what was sent)."""
    return _SPECIAL.sub("<" + ZWSP, markdown)


def escape(text: str) -> str:
    """Slack's three control characters; everything else is shown as written."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- blocks -------------------------------------------------------------------------------------


def _blocks(nodes: list[SyntaxTreeNode], sep: str = "\n\n") -> str:
    return sep.join(part for part in (_block(node) for node in nodes) if part)


def _block(node: SyntaxTreeNode) -> str:
    kind = node.type
    if kind in ("paragraph", "inline"):
        return "".join(_inline(child) for child in _inline_children(node))
    if kind == "heading":
        # A heading is bold as a whole; bold inside it would close the outer markers early.
        inner = "".join(_inline(child, bold=False) for child in _inline_children(node))
        return _styled("*", inner)
    if kind in ("bullet_list", "ordered_list"):
        return _list(node)
    if kind == "blockquote":
        return "\n".join("> " + line for line in _blocks(node.children).split("\n"))
    if kind in ("fence", "code_block"):
        body = escape(node.content)
        return f"```\n{body}{'' if body.endswith(chr(10)) else chr(10)}```"
    if kind == "hr":
        return "───"
    return escape(node.content)


def _inline_children(node: SyntaxTreeNode) -> list[SyntaxTreeNode]:
    if node.type == "inline":
        return node.children
    return [grandchild for child in node.children for grandchild in child.children]


def _list(node: SyntaxTreeNode) -> str:
    ordered = node.type == "ordered_list"
    number = int(str(node.attrs.get("start", 1))) if ordered else 0
    lines: list[str] = []
    for item in node.children:
        marker = f"{number}." if ordered else "•"
        number += 1
        body = _blocks(item.children, sep="\n").split("\n")
        lines.append(f"{marker} {body[0]}")
        lines.extend(_INDENT + line if line else line for line in body[1:])
    return "\n".join(lines)


# --- inline -------------------------------------------------------------------------------------


def _inline(node: SyntaxTreeNode, *, bold: bool = True) -> str:
    kind = node.type
    if kind == "text":
        return escape(node.content)
    if kind in ("softbreak", "hardbreak"):
        return "\n"
    if kind == "code_inline":
        return f"`{escape(node.content)}`"
    if kind in _STYLE:
        inner = "".join(_inline(child, bold=bold) for child in node.children)
        return inner if kind == "strong" and not bold else _styled(_STYLE[kind], inner)
    if kind in ("link", "image"):
        url = node.attrs.get("href" if kind == "link" else "src", "")
        label = "".join(_inline(child, bold=bold) for child in node.children)
        return _link(str(url), label)
    return escape(node.content)


def _styled(marker: str, inner: str) -> str:
    if not inner.strip():
        return inner
    return f"{_OPEN}{marker}{inner}{marker}{_CLOSE}"


def _link(url: str, label: str) -> str:
    if not _SAFE_LINK.match(url):
        return label or escape(url)
    # `|` and `>` end Slack's link syntax; the label loses them rather than break the link.
    label = label.replace("|", "¦").replace("&gt;", "›")
    target = escape(url).replace("|", "%7C")
    if not label or label == target:
        return f"<{target}>"
    return f"<{target}|{label}>"
