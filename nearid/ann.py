"""The FAISS index of a search gallery: exact inner product, or IVF / HNSW for large galleries, and how
well an approximate index finds the exact neighbours (docs/method.md section 6).

Only faiss and numpy are needed here, so the scale benchmark (`benchmarks/bench_search.py`) measures
exactly the indexes `nearid.search` builds without loading any model code.

Memory per vector of D dimensions: the exact index keeps float32 values, 4 D bytes, because batches of
queries then run as one matrix product; IVF and HNSW keep float16 values, 2 D bytes, the precision
the gallery stores anyway, so their distances are those of the stored embeddings. IVF adds an 8-byte
id; HNSW adds its links, about 8 M bytes for M links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INDEX_KINDS = ("exact", "ivf", "hnsw")
RECALL_K = 10


@dataclass(frozen=True)
class IndexSettings:
    """How the FAISS index searches: exact inner product, or IVF / HNSW for large galleries."""

    kind: str = "exact"
    nlist: int | None = None  # IVF inverted lists; None: 4 sqrt(n), at most n / 39 (FAISS wants 39 per list)
    nprobe: int = 32  # IVF lists visited per query
    hnsw_m: int = 32  # HNSW links per vector
    ef_construction: int = 80  # HNSW candidates while building
    ef_search: int = 128  # HNSW candidates while searching

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")

    def lists(self, n: int) -> int:
        return self.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))

    def new_index(self, dim: int, n: int):
        """An empty FAISS index for `n` vectors of `dim`, its search parameters set."""
        import faiss

        factory = {"exact": "Flat", "ivf": f"IVF{self.lists(n)},SQfp16", "hnsw": f"HNSW{self.hnsw_m},SQfp16"}
        index = faiss.index_factory(dim, factory[self.kind], faiss.METRIC_INNER_PRODUCT)
        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.by_residual = False  # the float16 values themselves, not residuals: exactly what the gallery holds
            ivf.cp.max_points_per_centroid = 64  # k-means on 64 images per list, not FAISS's 256: 4x faster
        if self.kind == "hnsw":
            index.hnsw.efConstruction = self.ef_construction
        return self.tune(index)

    def tune(self, index):
        """Set the search parameters (they are not all kept in the index file)."""
        import faiss

        if self.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.nprobe
        elif self.kind == "hnsw":
            index.hnsw.efSearch = self.ef_search
        return index


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 65536) -> tuple:
    """Brute-force top-k inner products in numpy: queries [Q, D], vectors [N, D] (any float dtype) ->
    (scores [Q, min(k, N)] float32, rows [Q, min(k, N)] int64), best first. Memory: a [Q, chunk] block."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.empty((len(queries), 0), np.float32)
    best_rows = np.empty((len(queries), 0), np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start:start + chunk], dtype=np.float32)
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        block_rows = np.broadcast_to(np.arange(start, start + len(block)), (len(queries), len(block)))
        rows = np.concatenate([best_rows, block_rows], axis=1)
        keep = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores, best_rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)


def recall_at_k(scores: np.ndarray, rows: np.ndarray, exact_scores: np.ndarray) -> float:
    """Recall@k of an index's results (scores [Q, k], rows [Q, k], -1 for an empty slot) against the exact
    top-k scores [Q, k]: the share of the exact neighbours found. An item tied with the exact k-th score
    counts as found, since duplicate images are interchangeable."""
    found = (rows >= 0) & (scores >= exact_scores[:, -1:] - 1e-5)
    return float(found.sum(1).mean() / exact_scores.shape[1])


def recall_against_exact(index, vectors: np.ndarray, k: int = RECALL_K, sample: int = 1000, seed: int = 0) -> float:
    """`recall_at_k` of the FAISS `index` over `vectors` [N, D], `sample` of the vectors as queries."""
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(sample, len(vectors)), replace=False))
    queries = np.asarray(vectors[rows], dtype=np.float32)
    exact_scores, _ = exact_top_k(queries, vectors, k)
    return recall_at_k(*index.search(queries, exact_scores.shape[1]), exact_scores)
