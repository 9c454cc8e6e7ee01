"""The knowledge base in Redis, so every replica sees the same documents.

Per collection `c` (keys share the hash tag `{kb:c}`):
- `sb:{kb:c}:sources`  hash: source id -> JSON (title, link, content hash, passages, times)
- `sb:{kb:c}:passages` hash: passage id (`source#n`) -> Passage JSON (with its keyword terms)
- `sb:{kb:c}:vectors`  hash: passage id -> float32 bytes of its embedding
- `sb:{kb:c}:meta`     hash: the embedding model the vectors came from, and its dimension
and `sb:kb:versions`, a hash of collection -> version, bumped in the same transaction as every
change. The turn's existing round trip reads that hash (RedisStore.start_turn), so a process
learns of new documents without an extra round trip per question.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from bot.conversation import StoreError
from bot.knowledge.embed import Vectors
from bot.knowledge.passages import Passage
from bot.store import KB_VERSIONS_KEY as VERSIONS_KEY

Outcome = Literal["added", "updated", "unchanged"]


def _key(collection: str, what: str) -> str:
    return f"sb:{{kb:{collection}}}:{what}"


@dataclass(frozen=True, slots=True)
class SourceInfo:
    source: str
    title: str
    link: str
    digest: str
    passages: int
    added: float
    updated: float

    def encode(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @staticmethod
    def decode(raw: bytes | str) -> SourceInfo:
        return SourceInfo(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    passages: list[Passage]
    vectors: Vectors | None
    model: str | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class KnowledgeStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def versions(self) -> dict[str, int]:
        try:
            raw = await self.redis.hgetall(VERSIONS_KEY)
        except (RedisError, OSError) as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc
        return {_text(k): int(v) for k, v in raw.items()}

    async def counts(self) -> dict[str, int]:
        """Sources per collection ever written to (0 once all are removed)."""
        names = sorted(await self.versions())
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hlen(_key(name, "sources"))
            sizes = await pipe.execute()
        return dict(zip(names, (int(n) for n in sizes), strict=True))

    async def digest(self, collection: str, source: str) -> str | None:
        raw = await self.redis.hget(_key(collection, "sources"), source)
        return SourceInfo.decode(raw).digest if raw else None

    async def put(
        self,
        collection: str,
        info: SourceInfo,
        passages: Sequence[Passage],
        vectors: Vectors | None,
        model: str | None,
    ) -> Outcome:
        """Replace a source's passages with these, all at once (or, when its content hash is
        what is stored, change nothing). Concurrent writers retry on the sources hash."""
        sources = _key(collection, "sources")
        outcome: list[Outcome] = []

        async def apply(pipe: Pipeline) -> None:
            old_raw = await pipe.hget(sources, info.source)
            old = SourceInfo.decode(old_raw) if old_raw else None
            outcome.clear()
            if old is not None and old.digest == info.digest:
                outcome.append("unchanged")
                return
            outcome.append("added" if old is None else "updated")
            stored = info if old is None else _replace_added(info, old.added)
            pipe.multi()  # type: ignore[no-untyped-call]
            if old is not None:
                self._queue_delete(pipe, collection, old)
            pipe.hset(sources, info.source, stored.encode())
            if passages:
                pipe.hset(
                    _key(collection, "passages"),
                    mapping={p.id: p.encode() for p in passages},
                )
            if vectors is not None and len(passages):
                pipe.hset(
                    _key(collection, "vectors"),
                    mapping={p.id: v.tobytes() for p, v in zip(passages, vectors, strict=True)},
                )
                pipe.hset(
                    _key(collection, "meta"),
                    mapping={"model": model or "", "dimension": vectors.shape[1]},
                )
            pipe.hincrby(VERSIONS_KEY, collection, 1)

        await self.redis.transaction(apply, sources)
        return outcome[0]

    async def remove(self, collection: str, source: str) -> bool:
        sources = _key(collection, "sources")
        removed: list[bool] = []

        async def apply(pipe: Pipeline) -> None:
            raw = await pipe.hget(sources, source)
            removed.clear()
            removed.append(raw is not None)
            if raw is None:
                return
            pipe.multi()  # type: ignore[no-untyped-call]
            self._queue_delete(pipe, collection, SourceInfo.decode(raw))
            pipe.hdel(sources, source)
            pipe.hincrby(VERSIONS_KEY, collection, 1)

        await self.redis.transaction(apply, sources)
        return removed[0]

    def _queue_delete(self, pipe: Pipeline, collection: str, old: SourceInfo) -> None:
        ids = [f"{old.source}#{i}" for i in range(old.passages)]
        if ids:
            pipe.hdel(_key(collection, "passages"), *ids)
            pipe.hdel(_key(collection, "vectors"), *ids)

    async def sources(self, collection: str) -> list[SourceInfo]:
        raw = await self.redis.hgetall(_key(collection, "sources"))
        return sorted((SourceInfo.decode(v) for v in raw.values()), key=lambda s: s.source)

    async def snapshot(self, collection: str) -> Snapshot:
        """Everything a process needs to search a collection, read in one transaction."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(VERSIONS_KEY, collection)
            pipe.hgetall(_key(collection, "passages"))
            pipe.hgetall(_key(collection, "vectors"))
            pipe.hgetall(_key(collection, "meta"))
            version, raw_passages, raw_vectors, meta = await pipe.execute()
        passages = sorted(
            (Passage.decode(v) for v in raw_passages.values()), key=lambda p: (p.source, p.index)
        )
        model = _text(meta[b"model"]) if b"model" in meta else None
        vectors = None
        if raw_vectors and all(p.id.encode() in raw_vectors for p in passages):
            vectors = (
                np.stack(
                    [np.frombuffer(raw_vectors[p.id.encode()], dtype=np.float32) for p in passages]
                )
                if passages
                else None
            )
        return Snapshot(int(version or 0), passages, vectors, model)


def _replace_added(info: SourceInfo, added: float) -> SourceInfo:
    return SourceInfo(
        info.source, info.title, info.link, info.digest, info.passages, added, time.time()
    )
