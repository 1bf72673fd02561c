"""Clustering images by identity: average-linkage agglomerative clustering on cosine distance, cut at
1 - threshold (docs/method.md section 6). Used by `search.py cluster` and by the retrieval benchmark
of `evaluate.py`, which picks the threshold that fits the val split best (`candidate_thresholds`).

Exact average linkage needs every pairwise distance, 8 bytes per pair: 10 GB for 50,000 images. A cut
at a threshold never joins images that no chain of pairs above it links, so `IdentityLinkage` computes
the linkage per such group (FAISS range search finds them), and its memory follows the largest group.
"""

from __future__ import annotations

import os

import numpy as np

from nearid.io import human_bytes


class IdentityLinkage:
    """Average-linkage agglomerative clustering on cosine distance, to be cut at any threshold >= `min_threshold`.

    A cut at similarity t joins two clusters only when their average similarity is >= t, so when at least
    one pair of their images is: every cluster lies inside one group of images linked by a chain of pairs
    >= t (`linked_groups`). Linking each such group on its own therefore gives exactly the clusters of one
    linkage over all images.
    """

    def __init__(self, vectors: np.ndarray, min_threshold: float = -1.0):
        from scipy.cluster.hierarchy import linkage

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n, self.min_threshold = len(vectors), min_threshold
        self.groups = []  # (member rows, scipy linkage matrix or None for a single image)
        for members in linked_groups(vectors, min_threshold):
            _check_linkage_memory(len(members), min_threshold)
            tree = linkage(vectors[members].astype(np.float64), method="average", metric="cosine") \
                if len(members) > 1 else None
            self.groups.append((members, tree))

    def labels(self, threshold: float) -> np.ndarray:
        """[N] cluster of each image at similarity `threshold`; cluster 0 is the largest (ties: first image)."""
        from scipy.cluster.hierarchy import fcluster

        if threshold < self.min_threshold:
            raise ValueError(f"this linkage can be cut at similarity >= {self.min_threshold}, not {threshold}")
        raw, offset = np.zeros(self.n, dtype=np.int64), 0
        for members, tree in self.groups:
            part = fcluster(tree, t=1.0 - threshold, criterion="distance") - 1 if tree is not None else np.zeros(1, int)
            raw[members] = part + offset
            offset += int(part.max()) + 1
        return _numbered_by_size(raw)


def linked_groups(vectors: np.ndarray, threshold: float, edges_per_step: int = 2**25) -> list:
    """Groups of rows linked by chains of pairs with similarity >= `threshold` (connected components).

    Pairs come from an exact FAISS range search, a block of rows at a time so that at most about
    `edges_per_step` pairs are held at once; groups are merged across blocks as they are found.
    """
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(vectors)
    if threshold <= -1.0 or n < 2:
        return [np.arange(n)]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    group = np.arange(n)  # the group of each row, refined block by block
    step = max(1, edges_per_step // n)
    for start in range(0, n, step):
        # Float32 slack: a group may come out larger than needed, which never changes the clusters.
        lims, _, found = index.range_search(vectors[start:start + step], threshold - 1e-5)
        sources = group[np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))]
        graph = coo_matrix((np.ones(len(found)), (sources, group[found])), shape=(n, n))
        _, merged = connected_components(graph, directed=False)
        group = merged[group]
    order = np.argsort(group, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(group[order])) + 1)


def _check_linkage_memory(size: int, threshold: float) -> None:
    needed = size * (size - 1) // 2 * 8 * 2  # the pairwise distances, and scipy's working copy
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total // 2:
        raise ValueError(f"clustering needs {human_bytes(needed)} for a group of {size} images linked at similarity "
                          f">= {threshold}, more than half of this machine's {human_bytes(total)}. Cluster at a "
                          "higher threshold, or fewer images.")


def _numbered_by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... by decreasing size, ties by their first image."""
    _, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    rank = np.lexsort((first, -counts))
    new = np.empty_like(rank)
    new[rank] = np.arange(len(rank))
    return new[inverse]


def candidate_thresholds(vectors: np.ndarray, neighbours: int = 10, count: int = 50) -> np.ndarray:
    """Thresholds worth trying on a set of embeddings [N, D]: `count` quantiles (1% to 99%) of every image's
    similarity to its `neighbours` nearest other images, where any sensible cut lies whatever the model's scale,
    each with its distance 1 - t rounded to three significant digits (`rounded_thresholds`)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        raise ValueError(f"choosing a clustering threshold needs at least 2 images, got {len(vectors)}; give a val "
                         "split with more rows")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, _ = index.search(vectors, min(neighbours + 1, len(vectors)))
    return np.unique(rounded_thresholds(np.quantile(scores[:, 1:], np.linspace(0.01, 0.99, count))))


def rounded_thresholds(thresholds: np.ndarray, digits: int = 3) -> np.ndarray:
    """Similarity thresholds t with their distance 1 - t rounded to `digits` significant digits.

    A quantile of similarities carries their last bits, which differ between CPUs (their float kernels sum
    in other orders): a threshold on such a value, applied to other images, joins or splits a cluster on one
    machine and not on another more often than a rounded one, which most machines share, as a threshold a
    user would choose. Significant digits, not decimals, keep candidates apart where all similarities lie
    close to 1; three keep a step of 0.001 for distances from 0.1 to 1.
    """
    distance = np.clip(1.0 - np.asarray(thresholds, dtype=np.float64), np.finfo(np.float64).tiny, None)
    scale = 10.0 ** (np.floor(np.log10(distance)) - (digits - 1))
    return 1.0 - np.round(distance / scale) * scale
