"""BM25 over item text (bm25s), shared by the BM25 baselines and the search hard-negative sampler.

Tokens: lower-cased words of 2+ characters, English stop words removed, no stemming (the locked
environment has no stemmer). Documents are `gensar_core.embed.semantic.item_text` (title, text,
categories), the same strings the semantic encoder sees.
"""
from __future__ import annotations

from typing import Sequence

import bm25s
import numpy as np


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    if not len(texts):
        return []
    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class BM25Index:
    """Scores of every document for a query: `scores(queries) -> (B, N)` float32."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.n_docs = len(docs)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(tokenize(docs), show_progress=False)
        self.vocab = {t for t in self.retriever.vocab_dict if t}

    def query_tokens(self, query: str) -> list[str]:
        """The query's tokens that occur in the corpus (others cannot score)."""
        return [t for t in tokenize([query or ""])[0] if t in self.vocab]

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(queries), self.n_docs), dtype=np.float32)
        for i, query in enumerate(queries):
            tokens = self.query_tokens(query)
            if tokens:
                out[i] = self.retriever.get_scores(tokens)
        return out
