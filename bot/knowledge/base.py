"""KnowledgeBase: adding, listing, removing and searching a collection's documents.

Ingestion reads, splits, analyses and embeds a source off the event loop, then replaces its
passages in Redis in one transaction. Search keeps one in-memory index per collection and
rebuilds it when the collection's version (read by the caller in a round trip it makes anyway,
or here) differs from the one it was built at.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from bot.conversation import StoreError
from bot.knowledge import ingest
from bot.knowledge.embed import Embedder, Vectors, is_e5
from bot.knowledge.index import CollectionIndex, terms
from bot.knowledge.passages import Hit, Passage, split_markdown, word_count
from bot.knowledge.store import KnowledgeStore, SourceInfo
from bot.ops.threads import on_own_thread

logger = logging.getLogger(__name__)

# Cosine similarity at or above which a passage counts as relevant. e5 models place unrelated
# texts around 0.7-0.8, so their floor sits higher than MiniLM-style models'.
E5_MIN_SIMILARITY = 0.82
DEFAULT_MIN_SIMILARITY = 0.50
_COLLECTION_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def default_min_similarity(model: str | None) -> float:
    return E5_MIN_SIMILARITY if model and is_e5(model) else DEFAULT_MIN_SIMILARITY


def check_collection(name: str) -> str:
    """A collection name: 1-64 of a-z, 0-9, `-`, `_`, `.`; raises ValueError saying so."""
    if not 1 <= len(name) <= 64 or not set(name) <= _COLLECTION_CHARS:
        raise ValueError("a collection name is 1 to 64 of a-z, 0-9, '-', '_' and '.'")
    return name


@dataclass(frozen=True, slots=True)
class Result:
    source: str
    outcome: str  # added, updated, unchanged, or "failed: why"
    passages: int = 0

    @property
    def failed(self) -> bool:
        return self.outcome.startswith("failed")


class KnowledgeBase:
    def __init__(
        self,
        store: KnowledgeStore,
        embedder: Embedder | None,
        *,
        min_similarity: float | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.min_similarity = (
            min_similarity
            if min_similarity is not None
            else default_min_similarity(embedder.name if embedder else None)
        )
        self._indexes: dict[str, tuple[int, CollectionIndex]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- ingestion ------------------------------------------------------------------------

    async def add(
        self,
        sources: Sequence[str],
        collection: str,
        report: Callable[[Result], None] = lambda result: None,
    ) -> list[Result]:
        results: list[Result] = []
        for argument in sources:
            try:
                expanded = await asyncio.to_thread(list, ingest.expand(argument))
            except ingest.SourceError as exc:
                expanded, failure = [], f"failed: {exc}"
            else:
                failure = "failed: no supported files in it"
            if not expanded:
                results.append(Result(argument, failure))
                report(results[-1])
                continue
            for source in expanded:
                results.append(await self._add_one(source, collection))
                report(results[-1])
        return results

    async def _add_one(self, source: str, collection: str) -> Result:
        try:
            document = await asyncio.to_thread(ingest.read, source)
            if await self.store.digest(collection, document.source) == document.digest:
                return Result(document.source, "unchanged")
            passages, vectors = await on_own_thread(self._prepare, document)  # embeds: torch
            now = time.time()
            info = SourceInfo(
                document.source,
                document.title,
                document.link,
                document.digest,
                len(passages),
                now,
                now,
            )
            model = self.embedder.name if self.embedder else None
            outcome = await self.store.put(collection, info, passages, vectors, model)
            return Result(document.source, outcome, len(passages))
        except ingest.SourceError as exc:
            return Result(source, f"failed: {exc}")
        except (RedisError, OSError, StoreError) as exc:
            return Result(source, f"failed: storage error: {type(exc).__name__}: {exc}")

    def _prepare(self, document: ingest.Document) -> tuple[list[Passage], Vectors | None]:
        embedder = self.embedder
        count = embedder.count if embedder else word_count
        target = embedder.passage_tokens if embedder else 200
        pieces = split_markdown(document.markdown, target=target, count=count)
        # The top heading is usually the title itself: the path starts below it.
        pieces = [(_below(heading, document.title), text) for heading, text in pieces]
        passages = [
            Passage(
                document.source,
                i,
                document.title,
                document.link,
                heading,
                text,
                tuple(terms(f"{document.title} {heading} {text}")),
            )
            for i, (heading, text) in enumerate(pieces)
        ]
        vectors = None
        if embedder is not None and passages:
            vectors = embedder.passages([_embedded_text(p) for p in passages])
        return passages, vectors

    async def remove(self, sources: Sequence[str], collection: str) -> list[Result]:
        results = []
        for source in sources:
            sid = ingest.source_id(source)
            removed = await self.store.remove(collection, sid)
            results.append(Result(sid, "removed" if removed else "failed: not in the collection"))
        return results

    async def sources(self, collection: str) -> list[SourceInfo]:
        return await self.store.sources(collection)

    async def collections(self) -> list[str]:
        """The collections that hold documents."""
        return [name for name, info in (await self.store.counts()).items() if info]

    # -- search ---------------------------------------------------------------------------

    async def search(
        self, collection: str, question: str, *, limit: int, version: int | None = None
    ) -> list[Hit]:
        """The relevant passages for `question`, best first. `version`: the collection's
        version as the caller read it (None: read it now; 0: the collection is empty)."""
        if version is None:
            version = (await self.store.versions()).get(collection, 0)
        if version == 0:
            return []
        index = await self._index(collection, version)
        vector = None
        if self.embedder is not None and index.vectors is not None:
            vector = await on_own_thread(self.embedder.query, question)  # torch
        question_terms = await asyncio.to_thread(terms, question)
        return await asyncio.to_thread(
            index.search, question_terms, vector, limit=limit,
            min_similarity=self.min_similarity,
        )  # fmt: skip

    async def _index(self, collection: str, version: int) -> CollectionIndex:
        cached = self._indexes.get(collection)
        if cached is not None and cached[0] == version:
            return cached[1]
        lock = self._locks.setdefault(collection, asyncio.Lock())
        async with lock:
            cached = self._indexes.get(collection)
            if cached is not None and cached[0] == version:
                return cached[1]
            snapshot = await self.store.snapshot(collection)
            vectors = snapshot.vectors
            if vectors is not None and (
                self.embedder is None or snapshot.model != self.embedder.name
            ):
                if self.embedder is not None:
                    logger.warning(
                        "collection %s was embedded with %s, not KB_EMBED_MODEL %s: keyword "
                        "search only until it is added again", collection, snapshot.model,
                        self.embedder.name,
                    )  # fmt: skip
                vectors = None
            index = await asyncio.to_thread(CollectionIndex.build, snapshot.passages, vectors)
            self._indexes[collection] = (snapshot.version, index)
            logger.info(
                "knowledge index %s v%d: %d passages",
                collection,
                snapshot.version,
                len(snapshot.passages),
            )
            return index


def _below(heading: str, title: str) -> str:
    first, _, rest = heading.partition(" › ")
    return rest if first.strip() == title.strip() else heading


def _embedded_text(passage: Passage) -> str:
    # The title and headings say what a passage is about when its text doesn't repeat them.
    context = " › ".join(part for part in (passage.title, passage.heading) if part)
    return f"{context}\n{passage.text}" if context else passage.text
