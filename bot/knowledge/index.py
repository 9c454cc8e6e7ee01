"""The in-memory search structures of one collection: keyword (bm25s over Kiwi morphemes) and
semantic (exact inner product over normalised vectors with numpy), fused by reciprocal rank.

Korean attaches particles and endings to words (`반품은`, `반품을`, `반품하려면`), so whitespace
tokens would rarely match; Kiwi's morphological analysis gives the stems (`반품`, `하`) that do.
English words come out of Kiwi as `SL` tokens: lower-cased, stop words dropped. Terms are
computed once at ingest and stored with each passage, so a replica rebuilding its index after a
change never re-analyses the collection.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from bot.knowledge.embed import Vectors
from bot.knowledge.passages import Hit, Passage

# Content morphemes: nouns, verb and adjective stems, roots, foreign words, numbers, hanja.
_KEEP = ("NN", "VV", "VA", "XR", "SL", "SN", "SH", "MAG")
# English stop words, and Korean light verbs, pronouns and bound nouns that every question has
# ("어떻게 하나요", "할 수 있나요"): alone they would make any passage look relevant.
_STOP = frozenset(STOPWORDS_EN) | {
    "do", "does", "did", "can", "could", "i", "my", "me", "how", "what", "when", "where", "why",
    "하", "있", "되", "없", "않", "어떻", "어떠", "이렇", "그렇", "것", "수", "등", "때", "좀",
    "왜",
}  # fmt: skip
RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion
CANDIDATES = 50  # each index's share of the fused ranking
MIN_COVERAGE = 0.5  # keyword relevance: at least half of the question's terms in the passage

_kiwi_lock = threading.Lock()
_kiwi: Any = None


def terms(text: str) -> list[str]:
    """Keyword-index terms of a text (Korean and English)."""
    global _kiwi
    with _kiwi_lock:
        if _kiwi is None:
            from kiwipiepy import Kiwi

            _kiwi = Kiwi()
        kiwi = _kiwi
    out: list[str] = []
    for token in kiwi.tokenize(text):
        if token.tag.startswith(_KEEP):
            form = token.form.lower()
            if form not in _STOP:
                out.append(form)
    return out


@dataclass
class CollectionIndex:
    passages: list[Passage]
    keyword: bm25s.BM25 | None
    vectors: Vectors | None  # (passages, dimension), rows normalised; None: keyword only

    @staticmethod
    def build(passages: Sequence[Passage], vectors: Vectors | None) -> CollectionIndex:
        keyword = None
        if passages:
            keyword = bm25s.BM25()
            # An empty term list would make bm25s skip the document and shift every id after it.
            keyword.index([list(p.tokens) or [""] for p in passages], show_progress=False)
        return CollectionIndex(list(passages), keyword, vectors)

    def search(
        self,
        question_terms: Sequence[str],
        question_vector: Vectors | None,
        *,
        limit: int,
        min_similarity: float,
    ) -> list[Hit]:
        """The best `limit` relevant passages, fused. A passage is relevant when its cosine
        similarity reaches `min_similarity` or it holds at least half of the question's terms."""
        if not self.passages:
            return []
        n = min(CANDIDATES, len(self.passages))
        keyword: dict[int, tuple[int, float]] = {}  # passage -> (rank, score)
        wanted = set(question_terms)
        if wanted and self.keyword is not None:
            ids, scores = self.keyword.retrieve(
                [list(question_terms)], k=n, show_progress=False, n_threads=1
            )
            rank = 0
            for i, score in zip(ids[0], scores[0], strict=True):
                if score > 0:
                    keyword[int(i)] = (rank, float(score))
                    rank += 1
        semantic: dict[int, tuple[int, float]] = {}
        if question_vector is not None and self.vectors is not None and len(self.vectors):
            sims = self.vectors @ question_vector
            top = np.argpartition(-sims, n - 1)[:n] if n < len(sims) else np.arange(len(sims))
            top = top[np.argsort(-sims[top])]
            semantic = {int(i): (rank, float(sims[i])) for rank, i in enumerate(top)}

        hits: list[Hit] = []
        for i in keyword.keys() | semantic.keys():
            kw, sem = keyword.get(i), semantic.get(i)
            passage = self.passages[i]
            covered = len(wanted & set(passage.tokens)) / len(wanted) if wanted else 0.0
            relevant = (kw is not None and covered >= MIN_COVERAGE) or (
                sem is not None and sem[1] >= min_similarity
            )
            if not relevant:
                continue
            score = sum(1.0 / (RRF_K + 1 + r[0]) for r in (kw, sem) if r is not None)
            hits.append(Hit(passage, score, kw[1] if kw else None, sem[1] if sem else None))
        hits.sort(key=lambda h: (-h.score, h.passage.id))
        return hits[:limit]
