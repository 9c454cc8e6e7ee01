"""`supportbot kb add|list|remove|search`: the knowledge base from the terminal.

Results go to stdout (one line per source, then a summary), logs to stderr; the exit status is
1 when any source failed. It needs Redis (the embedded one when REDIS_URL is unset) and, for
`add` and `search`, the embedding model; never the chat model.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import TextIO

from bot.commands.runtime import build_knowledge, open_redis
from bot.config import Settings
from bot.knowledge.base import KnowledgeBase, Result
from bot.knowledge.embed import EmbedError
from bot.ops.threads import on_own_thread


async def run(settings: Settings, action: str, args: list[str], collection: str | None) -> int:
    name = collection or settings.kb_collection
    redis, embedded = await open_redis(settings)
    try:
        kb = build_knowledge(settings, redis, embed=action in ("add", "search"))
        if action == "add":
            return await add(kb, args, name)
        if action == "list":
            return await show_sources(kb, name)
        if action == "remove":
            return _summary(await kb.remove(args, name), sys.stdout, report=True)
        return await search(kb, " ".join(args), name, settings.kb_top_k)
    except EmbedError as exc:
        print(f"supportbot: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def add(kb: KnowledgeBase, sources: list[str], collection: str) -> int:
    out = sys.stdout

    def report(result: Result) -> None:
        out.write(_line(result) + "\n")
        out.flush()  # progress, source by source, on long ingests

    if kb.embedder is not None:
        print(f"loading the embedding model {kb.embedder.name} ...", file=sys.stderr)
        await on_own_thread(kb.embedder.load)  # torch (bot/ops/threads.py)
    results = await kb.add(sources, collection, report)
    return _summary(results, out, report=False)


def _line(result: Result) -> str:
    extra = f" ({result.passages} passages)" if result.outcome in ("added", "updated") else ""
    return f"{result.source}: {result.outcome}{extra}"


def _summary(results: list[Result], out: TextIO, *, report: bool) -> int:
    if report:
        for result in results:
            out.write(_line(result) + "\n")
    counts: dict[str, int] = {}
    for result in results:
        word = "failed" if result.failed else result.outcome
        counts[word] = counts.get(word, 0) + 1
    out.write(", ".join(f"{n} {word}" for word, n in counts.items()) or "nothing to do")
    out.write("\n")
    return 1 if any(r.failed for r in results) else 0


async def show_sources(kb: KnowledgeBase, collection: str) -> int:
    sources = await kb.sources(collection)
    if not sources:
        print(f"collection {collection} has no sources")
        return 0
    for info in sources:
        added = _when(info.added)
        changed = f", updated {_when(info.updated)}" if info.updated > info.added else ""
        print(f"{info.title} — {info.link}: {info.passages} passages, added {added}{changed}")
    print(f"{len(sources)} sources in {collection}")
    return 0


async def search(kb: KnowledgeBase, query: str, collection: str, limit: int) -> int:
    if not query.strip():
        print("supportbot: kb search needs a question", file=sys.stderr)
        return 2
    hits = await kb.search(collection, query, limit=limit)
    if not hits:
        print(f"no relevant passage in {collection}")
        return 0
    for n, hit in enumerate(hits, 1):
        p = hit.passage
        scores = [f"fused {hit.score:.4f}"]
        if hit.keyword is not None:
            scores.append(f"keyword {hit.keyword:.2f}")
        if hit.similarity is not None:
            scores.append(f"similarity {hit.similarity:.3f}")
        where = f"{p.title} › {p.heading}" if p.heading else p.title
        print(f"[{n}] {where} — {p.link} ({', '.join(scores)})")
        print("    " + " ".join(p.text.split())[:300])
    return 0


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
