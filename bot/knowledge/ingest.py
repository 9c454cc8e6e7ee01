"""Sources -> documents: files, folders (recursively), http(s) pages and sitemaps, each read
into Markdown with its title and link. Conversion is markitdown's (HTML, PDF, DOCX); Markdown
and text are read as they are and must be UTF-8.

Every source is read on its own: a failure is a `Failed` with a one-line reason, and the other
sources go on. Downloads are bounded in size and time and must declare a content type we read.
"""

from __future__ import annotations

import hashlib
import io
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MAX_SOURCE_BYTES = 20 * 1024 * 1024  # a file or page larger than this is refused
FETCH_TIMEOUT_S = 20.0
MAX_SITEMAP_PAGES = 5000
TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".text", ".rst"}
CONVERTED_SUFFIXES = {".html", ".htm", ".pdf", ".docx"}
SUFFIXES = TEXT_SUFFIXES | CONVERTED_SUFFIXES
_CONTENT_TYPES = {
    "text/html": ".html",
    "application/xhtml+xml": ".html",
    "text/plain": ".txt",
    "text/markdown": ".md",
    "application/pdf": ".pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
}
_XML_TYPES = {"application/xml", "text/xml"}
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)
_TITLE = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.M)


class SourceError(Exception):
    """A source could not be read; str() is the reason shown on its line."""


@dataclass(frozen=True, slots=True)
class Document:
    source: str
    title: str
    link: str
    markdown: str
    digest: str  # of the bytes read: re-adding an unchanged source changes nothing


def expand(source: str) -> Iterator[str]:
    """The sources an argument names: itself, each supported file of a folder (recursively,
    sorted), or each page of a sitemap (fetched)."""
    if _is_url(source):
        if urlsplit(source).path.endswith(".xml"):
            yield from _sitemap(source)
        else:
            yield source
        return
    path = Path(source).expanduser()
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and child.suffix.lower() in SUFFIXES:
                yield str(child.resolve())
        return
    yield str(path.resolve()) if path.exists() else source


def source_id(source: str) -> str:
    """The id a source is stored under (a resolved path, or the URL as given)."""
    return source if _is_url(source) else str(Path(source).expanduser().resolve())


def read(source: str) -> Document:
    if _is_url(source):
        data, suffix = _fetch(source, set(_CONTENT_TYPES))
        return _document(source, source, data, suffix)
    path = Path(source)
    if not path.is_file():
        raise SourceError("no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SourceError(
            f"unsupported file type {suffix or '(none)'}; use one of " + ", ".join(sorted(SUFFIXES))
        )
    size = path.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise SourceError(
            f"too large ({size // 1_048_576} MB; the limit is {MAX_SOURCE_BYTES // 1_048_576} MB)"
        )
    return _document(str(path.resolve()), str(path.resolve()), path.read_bytes(), suffix)


def _document(source: str, link: str, data: bytes, suffix: str) -> Document:
    digest = hashlib.sha256(data).hexdigest()
    title = ""
    if suffix in TEXT_SUFFIXES:
        try:
            markdown = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SourceError(f"not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    else:
        markdown, title = _convert(data, suffix, link)
    front = _FRONT.match(markdown)
    if front:
        fields = dict(
            (k.strip().lower(), v.strip().strip("'\""))
            for k, _, v in (line.partition(":") for line in front.group(1).splitlines())
        )
        markdown = markdown[front.end() :]
        title = fields.get("title") or title
        link = fields.get("url") or link
    if not title:
        heading = _TITLE.search(markdown)
        title = heading.group(1) if heading else Path(urlsplit(link).path).stem or link
    if not markdown.strip():
        raise SourceError("no text found in it")
    return Document(source, title.strip(), link, markdown, digest)


def _convert(data: bytes, suffix: str, link: str) -> tuple[str, str]:
    from markitdown import MarkItDown, StreamInfo
    from markitdown.converters import DocxConverter, HtmlConverter, PdfConverter

    # Only the converter for the file's type: markitdown would otherwise fall back to reading
    # a broken PDF as plain text and "succeed".
    kinds = {".pdf": PdfConverter, ".docx": DocxConverter, ".html": HtmlConverter}
    converter = MarkItDown(enable_builtins=False, enable_plugins=False)
    converter.register_converter(kinds.get(suffix, HtmlConverter)())
    kind = "HTML" if suffix == ".htm" else suffix[1:].upper()
    try:
        result: Any = converter.convert_stream(
            io.BytesIO(data), stream_info=StreamInfo(extension=suffix, url=link)
        )
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise SourceError(f"cannot read it as {kind}: {lines[-1][:200]}") from None
    return str(result.markdown), str(result.title or "")


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _fetch(url: str, accepted: set[str]) -> tuple[bytes, str]:
    request = urllib.request.Request(url, headers={"User-Agent": "supportbot-kb/1"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310
            kind = response.headers.get_content_type()
            if kind not in accepted:
                raise SourceError(f"unsupported content type {kind}")
            data: bytes = response.read(MAX_SOURCE_BYTES + 1)
    except SourceError:
        raise
    except urllib.error.HTTPError as exc:
        raise SourceError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise SourceError(f"unreachable: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise SourceError(f"unreachable: {type(exc).__name__}: {exc}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise SourceError(f"too large (over {MAX_SOURCE_BYTES // 1_048_576} MB)")
    return data, _CONTENT_TYPES.get(kind, ".xml")


def _sitemap(url: str) -> Iterator[str]:
    from defusedxml import ElementTree

    data, _ = _fetch(url, _XML_TYPES | {"text/plain"})
    try:
        root = ElementTree.fromstring(data)
    except Exception as exc:
        raise SourceError(f"not a sitemap: {type(exc).__name__}: {exc}") from None
    pages = [el.text.strip() for el in root.iter() if el.tag.endswith("loc") and el.text]
    for page in pages[:MAX_SITEMAP_PAGES]:
        if _is_url(page):
            yield page
