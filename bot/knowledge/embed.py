"""The sentence-embedding model (KB_EMBED_MODEL): loaded once per process, on the GPU when there
is one, and used for both passages and questions.

The e5 family was trained with `query: ` and `passage: ` prefixes and ranks poorly without them
(intfloat/multilingual-e5-* model cards); other models get the text as it is. Vectors are
L2-normalised, so a dot product is the cosine similarity. Encoding runs torch: call it off the
event loop.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.ops.logging import route_library_logs

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
# Passages are cut to at most this many tokens (fewer when the model's window is smaller), with
# room for the prefix and the special tokens.
PASSAGE_TOKENS = 256
_RESERVED = 16


class EmbedError(Exception):
    """The embedding model could not be loaded; str() says which and why."""


def is_e5(model: str) -> bool:
    """Whether KB_EMBED_MODEL names an e5 model, by its own name (the hub id's or the directory's
    last part: `multilingual-e5-small`), not by "e5" anywhere in a path."""
    tail = Path(model.rstrip("/")).name.lower()
    return re.search(r"(?:^|[^a-z0-9])e5(?:[^a-z0-9]|$)", tail) is not None


class Embedder:
    def __init__(self, name: str, *, device: str | None = None) -> None:
        self.name = name
        self._device = None if device in (None, "auto") else device
        self._model: Any = None
        self._lock = threading.Lock()
        # The fast tokenizer is not safe to share between threads (concurrent calls fail with
        # mismatched padding), and ingests and questions run in threads: one use at a time.
        self._busy = threading.Lock()
        e5 = is_e5(name)
        self._query = "query: " if e5 else ""
        self._passage = "passage: " if e5 else ""

    def _loaded(self) -> Any:
        with self._lock:  # one load even when the first two questions race
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                route_library_logs()  # its transformers would log and draw bars of its own

                try:
                    # device=None: sentence-transformers takes CUDA when it is available.
                    self._model = SentenceTransformer(self.name, device=self._device)
                except Exception as exc:
                    raise EmbedError(
                        f"cannot load KB_EMBED_MODEL {self.name!r}: {type(exc).__name__}: {exc}"
                    ) from exc
                logger.info("embedding model %s loaded on %s", self.name, self._model.device)
            return self._model

    def load(self) -> None:
        self._loaded()

    @property
    def device(self) -> str:
        return str(self._loaded().device)

    @property
    def dimension(self) -> int:
        model = self._loaded()
        # Renamed in sentence-transformers 6; the old name still works with a warning.
        getter = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension
        )
        return int(getter())

    @property
    def passage_tokens(self) -> int:
        window = int(self._loaded().max_seq_length or PASSAGE_TOKENS)
        return min(PASSAGE_TOKENS, window) - _RESERVED

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text in the model's own tokenizer (no special tokens)."""
        if not texts:
            return []
        model = self._loaded()
        with self._busy:
            encoded = model.tokenizer(list(texts), add_special_tokens=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def passages(self, texts: Sequence[str], batch_size: int = 64) -> Vectors:
        return self._encode([self._passage + t for t in texts], batch_size)

    def query(self, text: str) -> Vectors:
        vector: Vectors = self._encode([self._query + text], 1)[0]
        return vector

    def _encode(self, texts: list[str], batch_size: int) -> Vectors:
        model = self._loaded()
        with self._busy:
            vectors = model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        result: Vectors = np.asarray(vectors, dtype=np.float32)
        return result
