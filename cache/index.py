"""Cosine nearest neighbours over unit vectors with FAISS, one index per cache partition.

``flat`` is exact (inner product over every vector; fine to a few hundred thousand entries per
partition). ``hnsw`` is FAISS's graph index for millions: sub-millisecond approximate search. HNSW
cannot delete, so removed ids are filtered from results and the graph is rebuilt once they make up
a quarter of it.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["flat", "hnsw"]
HNSW_NEIGHBOURS = 32


class VectorIndex:
    def __init__(self, dim: int, kind: IndexKind = "flat"):
        if kind not in ("flat", "hnsw"):
            raise ValueError(f"index kind must be 'flat' or 'hnsw', got {kind!r}")
        self.dim, self.kind = dim, kind
        self.index = self._empty()
        self.removed: set[int] = set()
        self.ids: set[int] = set()

    def _empty(self) -> faiss.Index:
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        return faiss.IndexIDMap2(faiss.IndexHNSWFlat(self.dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT))

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, entry_id: int, vector: np.ndarray) -> None:
        if entry_id in self.ids:
            return  # events are replayed at least once; adding twice is a no-op
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise ValueError(f"embedding has {vector.shape[1]} dimensions, the index {self.dim}")
        self.index.add_with_ids(vector, np.array([entry_id], dtype=np.int64))
        self.ids.add(entry_id)

    def remove(self, entry_id: int) -> None:
        if entry_id not in self.ids:
            return
        self.ids.discard(entry_id)
        if self.kind == "flat":
            self.index.remove_ids(np.array([entry_id], dtype=np.int64))
            return
        self.removed.add(entry_id)
        if len(self.removed) * 4 > self.index.ntotal:
            self._rebuild()

    def _rebuild(self) -> None:
        live = np.array(sorted(self.ids), dtype=np.int64)
        vectors = np.stack([self.index.reconstruct(int(i)) for i in live]) if len(live) else None
        self.index, self.removed = self._empty(), set()
        if vectors is not None:
            self.index.add_with_ids(vectors, live)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (id, cosine similarity) pairs, most similar first."""
        if not self.ids:
            return []
        want = min(k + len(self.removed), self.index.ntotal)
        scores, ids = self.index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), want)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i in self.ids]
        return hits[:k]
