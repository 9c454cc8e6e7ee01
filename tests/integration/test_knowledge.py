"""The knowledge base over a real Redis with the real analyser (Kiwi), bm25s and the offline
MiniLM embedder: adding, re-adding, removing, searching, and sources that fail alone."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from bot.knowledge import ingest
from bot.knowledge.base import KnowledgeBase
from bot.knowledge.store import KnowledgeStore
from tests.support.knowledge import knowledge, minilm, write_docs


async def stored(redis) -> dict[bytes, bytes]:
    """Every knowledge-base key and its content, to show that nothing changed."""
    out = {}
    for key in sorted([k async for k in redis.scan_iter(match="sb:*kb*")]):
        kind = await redis.type(key)
        out[key] = await (redis.hgetall(key) if kind == b"hash" else redis.get(key))
    return out


async def test_a_folder_is_added_recursively_once_and_searched(redis, tmp_path):
    docs = write_docs(tmp_path / "docs")
    kb = knowledge(redis)
    results = await kb.add([str(docs)], "default")
    assert [(r.source.rsplit("/", 1)[-1], r.outcome) for r in results] == [
        ("shipping.md", "added"),
        ("returns.md", "added"),
        ("warranty.txt", "added"),
    ]
    assert all(r.passages >= 1 for r in results)
    before = await stored(redis)
    again = await kb.add([str(docs)], "default")
    assert {r.outcome for r in again} == {"unchanged"}
    assert await stored(redis) == before

    hits = await kb.search("default", "How do I return an item?", limit=4)
    top = hits[0].passage
    assert top.title == "Returns and refunds"
    assert top.link == "https://shop.example/help/returns"  # front matter `url:`
    assert top.heading == "How to return an item"
    assert "30 days" in top.text
    assert hits[0].keyword is not None and hits[0].similarity is not None

    sources = {s.title: s for s in await kb.sources("default")}
    assert set(sources) == {"Returns and refunds", "배송 안내", "warranty"}  # text: its name
    assert sources["warranty"].link == str((docs / "warranty.txt").resolve())


async def test_korean_particles_and_endings_do_not_break_keyword_matches(redis, tmp_path):
    kb = knowledge(redis, semantic=False)
    await kb.add([str(write_docs(tmp_path / "docs"))], "default")
    # `교환은`/`교환하려면` vs `교환을` in the text: only the stem matches.
    for question in ("교환은 어떻게 하나요?", "교환하려면 어디서 신청해요?"):
        hits = await kb.search("default", question, limit=4)
        assert hits, question
        assert hits[0].passage.heading == "교환 방법", question
    assert await kb.search("default", "배송비 환불 계좌", limit=4) == [] or all(
        "교환" not in h.passage.heading for h in await kb.search("default", "배송비", limit=4)
    )


async def test_an_unrelated_question_finds_nothing_relevant(redis, tmp_path):
    kb = knowledge(redis)
    await kb.add([str(write_docs(tmp_path / "docs"))], "default")
    assert await kb.search("default", "What is the capital of Mongolia?", limit=4) == []


async def test_a_changed_source_replaces_its_passages_and_remove_takes_them(redis, tmp_path):
    docs = write_docs(tmp_path / "docs")
    kb = knowledge(redis)
    await kb.add([str(docs)], "default")
    (docs / "warranty.txt").write_text("Warranty\n\nThe warranty lasts five years now.\n")
    [result] = await kb.add([str(docs / "warranty.txt")], "default")
    assert result.outcome == "updated"
    hits = await kb.search("default", "how long is the warranty", limit=4)
    assert "five years" in hits[0].passage.text
    assert not any("two-year" in h.passage.text for h in hits)

    [removed] = await kb.remove([str(docs / "warranty.txt")], "default")
    assert removed.outcome == "removed"
    assert not any(
        h.passage.title == "warranty"
        for h in await kb.search("default", "how long is the warranty", limit=4)
    )
    [missing] = await kb.remove([str(docs / "warranty.txt")], "default")
    assert missing.failed


async def test_each_bad_source_fails_alone_and_changes_nothing(redis, tmp_path):
    docs = write_docs(tmp_path / "docs")
    kb = knowledge(redis)
    await kb.add([str(docs)], "default")
    before = await stored(redis)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me\n".encode("latin-1"))
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    huge = bad / "huge.md"
    with huge.open("wb") as f:  # 50 MB, sparse: no disk is spent
        f.truncate(50 * 1024 * 1024)
    (bad / "table.csv").write_text("a,b\n")
    results = await kb.add(
        [str(bad / "latin1.txt"), str(bad / "broken.pdf"), str(huge), str(bad / "table.csv"),
         str(tmp_path / "missing.md"), str(tmp_path / "empty-folder-does-not-exist")],
        "default",
    )  # fmt: skip
    reasons = [r.outcome for r in results]
    assert reasons[0].startswith("failed: not UTF-8 text"), reasons
    assert reasons[1].startswith("failed: cannot read it as PDF"), reasons
    assert reasons[2].startswith("failed: too large (50 MB"), reasons
    assert reasons[3].startswith("failed: unsupported file type .csv"), reasons
    assert reasons[4] == "failed: no such file"
    assert await stored(redis) == before

    # A source that was good and turns bad keeps what was stored for it.
    (docs / "warranty.txt").write_bytes(b"\xff\xfe broken")
    [result] = await kb.add([str(docs / "warranty.txt")], "default")
    assert result.failed
    assert await stored(redis) == before


async def test_two_adds_at_once_both_land(redis, tmp_path):
    docs = write_docs(tmp_path / "docs")
    one, two = knowledge(redis), knowledge(redis)
    first, second = await asyncio.gather(
        one.add([str(docs / "returns.md"), str(docs / "warranty.txt")], "default"),
        two.add([str(docs / "ko"), str(docs / "returns.md")], "default"),
    )
    outcomes = [r.outcome for r in first + second]
    assert outcomes.count("added") == 3 and not any(r.failed for r in first + second)
    assert len(await one.sources("default")) == 3
    store = KnowledgeStore(redis)
    snapshot = await store.snapshot("default")
    total = sum(s.passages for s in await one.sources("default"))
    assert len(snapshot.passages) == total and snapshot.vectors is not None
    assert snapshot.vectors.shape == (total, 384)


async def test_another_process_sees_a_new_document_at_the_next_version(redis, tmp_path):
    docs = write_docs(tmp_path / "docs")
    writer, reader = knowledge(redis), knowledge(redis)
    await writer.add([str(docs / "returns.md")], "default")
    assert not await reader.search("default", "blender warranty", limit=4)
    await writer.add([str(docs / "warranty.txt")], "default")
    hits = await reader.search("default", "blender warranty", limit=4)
    assert hits and hits[0].passage.title == "warranty"


async def test_keyword_only_without_an_embedding_model(redis, tmp_path):
    kb = KnowledgeBase(KnowledgeStore(redis), None)
    await kb.add([str(write_docs(tmp_path / "docs"))], "default")
    assert (await KnowledgeStore(redis).snapshot("default")).vectors is None
    hits = await kb.search("default", "return an item", limit=4)
    assert hits[0].passage.heading == "How to return an item"
    assert hits[0].similarity is None


async def test_collections_are_separate(redis, tmp_path):
    docs = write_docs(tmp_path / "docs")
    kb = knowledge(redis)
    await kb.add([str(docs / "warranty.txt")], "hardware")
    assert await kb.search("default", "blender warranty", limit=4) == []
    assert await kb.collections() == ["hardware"]


def test_passages_fit_the_embedding_models_token_size(tmp_path):
    embedder = minilm()
    long = "# Manual\n\n" + "\n\n".join(
        f"## Step {i}\n" + " ".join(f"word{i}x{j}" for j in range(150)) for i in range(3)
    )
    path = tmp_path / "manual.md"
    path.write_text(long)
    document = ingest.read(str(path))
    kb = KnowledgeBase(KnowledgeStore(None), embedder)  # type: ignore[arg-type]
    passages, vectors = kb._prepare(document)
    sizes = embedder.count([p.text for p in passages])
    assert len(passages) > 3 and max(sizes) <= embedder.passage_tokens
    assert {p.heading for p in passages} == {"Step 0", "Step 1", "Step 2"}
    assert vectors is not None and vectors.shape == (len(passages), 384)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root reads anything")
async def test_an_unreadable_file_fails_alone(redis, tmp_path):
    path = tmp_path / "secret.md"
    path.write_text("# Secret\n\ntext\n")
    path.chmod(0)
    [result] = await knowledge(redis).add([str(path)], "default")
    assert result.failed


async def test_embedding_runs_on_threads_that_end_so_no_openmp_team_outlives_it(
    redis, tmp_path, monkeypatch
):
    """torch keeps an OpenMP team per thread for the thread's life, and a team left on a pooled
    worker made every later token of the local model ~35 % slower on a 2-core host
    (bot/ops/threads.py): documents and questions are embedded on threads that end."""
    kb = knowledge(redis)
    assert kb.embedder is not None
    threads: list[threading.Thread] = []
    real_encode = kb.embedder._encode

    def encode(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(kb.embedder, "_encode", encode)
    await kb.add([str(write_docs(tmp_path / "docs"))], "default")
    assert await kb.search("default", "How do I return an item?", limit=4)
    assert len(threads) == 4  # three documents and a question
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive(), thread.name
