"""Evaluation building blocks shared by `evaluate.py`, training's validation, scoring and search.

- `embed_images`: a scorer and the unique images of a run (`ImageIndex`) -> embeddings from the
  embed-once store (each image computed once, ever), the images left out and what was computed.
- `VectorTable`, `embedding_matrix`, `slot_embeddings`: embeddings by image key, stacked into the
  arrays the metrics take (a missing image is a zero row with presence False, never compacted).
- The NearID benchmark (`nearid_keys`, `nearid_margins_by_source`, `nearid_summary`,
  `nearid_headline`, `nearid_rows`), MTG (`mtg_keys`, `mtg_oracles`, `mtg_similarities`, `mtg_rows`), DreamBench++
  from images (`dreambench_pairs_index`, `dreambench_scores`) and near-identity retrieval
  (`retrieval_gallery`, `retrieval_ranking`, `retrieval_threshold`, `retrieval_clustering`,
  `retrieval_rows`): keys in, metric inputs out; the metrics themselves are `nearid.metrics`'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from nearid import clustering, metrics
from nearid.cli import lazy_module
from nearid.data import dreambench_files
from nearid.store.fill import FillOptions, fill

if TYPE_CHECKING:
    from nearid.store.image_index import ImageIndex

# Loaded on first use: a run that reads published score files needs neither the dataset readers (datasets) nor
# the image decode (transformers, through the Hub's image processor).
readers, images = lazy_module("nearid.data.readers"), lazy_module("nearid.images")

# --------------------------------------------------------------------------------------------------
# Embeddings by image key


class VectorTable(Mapping):
    """{image key: embedding} backed by one float32 matrix (rows in key order)."""

    def __init__(self, keys: Sequence[str], matrix: np.ndarray):
        self.matrix = matrix
        self._rows = {key: row for row, key in enumerate(keys)}

    def __getitem__(self, key):
        return self.matrix[self._rows[key]]

    def __iter__(self):
        return iter(self._rows)

    def __len__(self):
        return len(self._rows)

    def __contains__(self, key):
        return key in self._rows

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]


@dataclass
class Embedded:
    """The embeddings of a run's images, the images left out ({"image", "reason"}), and the work done."""

    vectors: VectorTable
    skipped: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def embed_images(scorer, index: ImageIndex, cache_dir, options: FillOptions, state=None,
                 allow_none: bool = False) -> Embedded:
    """Embed every image of `index` the store under `cache_dir` lacks; return all of them.

    Images that cannot be read are an ImageLoadError naming them, or with `options.skip_errors`
    left out and listed. A run that embeds no image at all is an ImageLoadError too, unless
    `allow_none` (a search index that adds only unreadable files still holds its other images).
    With several processes (`state`) each computes a share; every process returns the same
    embeddings.
    """
    store, report = fill(cache_dir, scorer.fingerprint, scorer.format, index, scorer.loader, scorer, options, state)
    keys = [key for key in index if key in store]
    if not keys and not allow_none:
        raise images.ImageLoadError(f"none of the {len(index)} images could be embedded; for example: "
                                    f"{next(iter(report.skipped.values()), 'no images were given')}")
    skipped = [{"image": where, "reason": reason} for where, reason in sorted(index.unreadable.items())]
    skipped += [{"image": index.where(key), "reason": reason} for key, reason in sorted(report.skipped.items())]
    stats = {"unique_images": len(index), "images_embedded": report.images_computed,
             "forward_passes": report.forward_passes}
    return Embedded(VectorTable(keys, store.numpy(keys)), skipped, stats)


def embedding_matrix(vectors: Mapping, keys: Sequence, dim: int) -> tuple:
    """Stack embeddings of `keys` (None or unknown -> a zero row, presence False): ([n, dim], [n] bool)."""
    matrix = np.zeros((len(keys), dim), dtype=np.float32)
    present = np.zeros(len(keys), dtype=bool)
    for row, key in enumerate(keys):
        if key is not None and key in vectors:
            matrix[row] = vectors[key]
            present[row] = True
    return matrix, present


def slot_embeddings(vectors: Mapping, slot_keys: Sequence[Sequence], dim: int) -> tuple:
    """Per-slot key lists -> ([rows, slots, dim] float32 embeddings, [rows, slots] presence)."""
    columns = [embedding_matrix(vectors, keys, dim) for keys in slot_keys]
    return np.stack([m for m, _ in columns], axis=1), np.stack([p for _, p in columns], axis=1)


# --------------------------------------------------------------------------------------------------
# NearID benchmark


def nearid_keys(bench, index: ImageIndex, rows: Sequence[int] | None = None, split: str | None = None) -> tuple:
    """Image keys of a joined benchmark: views [3][rows] and distractors {source: [3][rows]}.

    rows: the benchmark rows to take (default all); split: its name, said in errors beside the
    dataset (training's held-out sets)."""
    suffix = f" ({split} split)" if split else ""
    views = [index.add_column(f"positives{suffix}", bench.positives, column, rows) for column in bench.view_columns]
    sources = {name: [index.add_column(f"source {name}{suffix}", bench.sources[name], column, rows)
                      for column in columns]
               for name, columns in bench.distractor_columns.items()}
    return views, sources


def nearid_margins_by_source(vectors: Mapping, view_keys, source_keys: Mapping, dim: int) -> dict:
    """{source: (margins [N, 6], valid [N, 6])} of `metrics.nearid_margins` for every source."""
    views, view_mask = slot_embeddings(vectors, view_keys, dim)
    margins = {}
    for name, keys in source_keys.items():
        distractors, distractor_mask = slot_embeddings(vectors, keys, dim)
        margins[name] = metrics.nearid_margins(views, distractors, view_mask, distractor_mask)
    return margins


def nearid_summary(margins: Mapping) -> dict:
    """Per-source SSR/PA, the pool of the given sources, and Table 1's 7-setting average only when
    all 7 settings were given (FluxC, reported separately in the paper, never enters a pool)."""
    summary = {"per_source": {name: metrics.nearid_scores(*m) for name, m in margins.items()}}
    given = [name for name in margins if not name.startswith("fluxc")]
    if given:
        summary["pooled_given"] = metrics.nearid_pooled_scores(margins, sources=given)
    if all(name in margins for name in metrics.NEARID_TABLE1_SOURCES):
        summary["table1_average"] = metrics.nearid_pooled_scores(margins)
    return summary


def nearid_headline(summary: Mapping) -> dict | None:
    """The NearID numbers a model card publishes: Table 1's 7-setting average when all 7 were given,
    else the pool of the given sources (FluxC never in it); None when only FluxC was given.
    Training's final evaluation and `evaluate.py --model-index` both publish this one."""
    return summary.get("table1_average", summary.get("pooled_given"))


def nearid_rows(ids: Sequence, margins: Mapping) -> list:
    """Per sample and source: terms, wins, whether all won, and the smallest margin."""
    rows = []
    for name, (margin, valid) in margins.items():
        for row, sample_id in enumerate(ids):
            terms = margin[row][valid[row]]
            rows.append({"row": row, "id": sample_id, "source": name, "n_terms": int(valid[row].sum()),
                         "n_wins": int((terms > 0).sum()), "all_win": bool(len(terms) and (terms > 0).all()),
                         "min_margin": float(terms.min()) if len(terms) else None})
    return rows


# --------------------------------------------------------------------------------------------------
# MTG (part-level)

# The 4 embedded images of an MTG row: the originals o1, o2 and their part-inpainted versions i1, i2.
MTG_IMAGES = {"o1": "image_1_original", "i1": "image_1_inpainted",
              "o2": "image_2_original", "i2": "image_2_inpainted"}
# The 5 similarities of the MTG metrics as (name, image, image), in `metrics.mtg_scores` argument order.
MTG_SIMILARITIES = (("s12", "o1", "o2"), ("s11p", "o1", "i1"), ("s22p", "o2", "i2"),
                    ("s12p", "o1", "i2"), ("s21p", "o2", "i1"))
# The 4 correlations of MO as (similarity, view of the oracle); the first two make MOpair.
MTG_CORRELATIONS = (("s11p", 1), ("s22p", 2), ("s12p", 2), ("s21p", 1))


def mtg_keys(dataset, index: ImageIndex) -> tuple:
    """({image slot: keys per row}, skipped list of absent images); an absent image is an error
    unless the index skips errors (its row is then left out)."""
    keys = {slot: index.add_column("MTG", dataset, column) for slot, column in MTG_IMAGES.items()}
    skipped = [{"image": f"MTG row {row} column {MTG_IMAGES[slot]}", "reason": "missing image"}
               for slot, slot_keys in keys.items() for row, key in enumerate(slot_keys)
               if key is None and f"MTG row {row} column {MTG_IMAGES[slot]}" not in index.unreadable]
    if skipped and not index.skip_errors:
        raise ValueError(f"{skipped[0]['image']} has no image ({len(skipped)} missing in all); every MTG row "
                         "needs its 4 images")
    return keys, skipped


def mtg_oracles(dataset, skip_errors: bool) -> tuple:
    """([N, 2] oracle of view 1 and 2 of every row, skipped list).

    A row whose masks cannot be read, or whose object mask is empty (the oracle is undefined), is an
    error, or with `skip_errors` NaN and listed.
    """
    columns = readers.mtg_view_columns(dataset)
    oracles, skipped = np.full((len(dataset), 2), np.nan), []
    for row in range(len(dataset)):
        for view in (1, 2):
            where = f"MTG row {row} view {view}"
            try:
                masks = readers.mtg_view_masks(columns, row, view, where)
                oracles[row, view - 1] = metrics.mtg_oracle(*masks)
            except ValueError as error:  # ImageLoadError (names `where` itself), or an empty object mask
                reason = str(error) if isinstance(error, images.ImageLoadError) else f"{where}: {error}"
                if not skip_errors:
                    raise type(error)(reason) from error
                skipped.append({"image": where, "reason": reason})
    return oracles, skipped


def mtg_similarities(vectors: Mapping, keys: Mapping, dim: int) -> dict:
    """{name: [N] cosine similarity} for `MTG_SIMILARITIES`; NaN where either image is absent."""
    embedded = {slot: embedding_matrix(vectors, slot_keys, dim) for slot, slot_keys in keys.items()}
    sims = {}
    for name, a, b in MTG_SIMILARITIES:
        (emb_a, present_a), (emb_b, present_b) = embedded[a], embedded[b]
        dots = np.einsum("nd,nd->n", emb_a.astype(np.float64), emb_b.astype(np.float64))
        sims[name] = np.where(present_a & present_b, dots, np.nan)
    return sims


def mtg_scored_rows(sims: Mapping, oracles: np.ndarray) -> np.ndarray:
    """[N] bool: rows with both oracles and all 5 similarities (nothing missing or skipped)."""
    return np.isfinite(oracles).all(1) & np.isfinite(np.stack(list(sims.values()), 1)).all(1)


def _finite_or_none(value):
    return float(value) if np.isfinite(value) else None


def mtg_rows(sims: Mapping, oracles: np.ndarray) -> list:
    """Per-row records: oracles, the 5 similarities, both margins and whether both win."""
    rows = []
    for row, (oracle1, oracle2) in enumerate(oracles):
        sim = {name: values[row] for name, values in sims.items()}
        m1, m2 = sim["s12"] - sim["s11p"], sim["s12"] - sim["s22p"]
        scored = bool(np.isfinite([oracle1, oracle2, *sim.values()]).all())
        rows.append({"row": row, "scored": scored, "oracle1": _finite_or_none(oracle1),
                     "oracle2": _finite_or_none(oracle2), **{k: _finite_or_none(v) for k, v in sim.items()},
                     "m1": _finite_or_none(m1), "m2": _finite_or_none(m2),
                     "both_win": bool(m1 > 0 and m2 > 0) if scored else None})
    return rows


# --------------------------------------------------------------------------------------------------
# DreamBench++ from images


def dreambench_pairs_index(samples, methods: Sequence[str], index: ImageIndex) -> dict:
    """{method: (keys, reference image keys, generated image keys)} of a samples folder."""
    pairs = {}
    for method in methods:
        triples = dreambench_files.dreambench_pairs(samples, method)
        pairs[method] = ([k for k, _, _ in triples], index.add_files([s for _, s, _ in triples]),
                         index.add_files([t for _, _, t in triples]))
    return pairs


def dreambench_scores(pairs: Mapping, vectors: Mapping) -> dict:
    """{method: {key: 100 x cosine}} of every pair whose two images were embedded."""
    return {method: {k: float(100 * np.dot(vectors[s], vectors[t]))
                     for k, s, t in zip(keys, src, tgt) if s in vectors and t in vectors}
            for method, (keys, src, tgt) in pairs.items()}


# --------------------------------------------------------------------------------------------------
# Near-identity retrieval (docs/method.md section 6)


@dataclass
class RetrievalGallery:
    """The gallery of the near-identity retrieval benchmark: every present view of the rows and every
    present distractor of every source, M items in all.

    embeddings [M, D]; identity [M] (a view: its row; a distractor: an identity of its own); row [M]
    (the benchmark row the item belongs to); is_view [M] bool; names [M] (where each image came from).
    """

    embeddings: np.ndarray
    identity: np.ndarray
    row: np.ndarray
    is_view: np.ndarray
    names: list

    def queries(self) -> np.ndarray:
        """The items that are queries: views whose row has another present view."""
        views_per_row = np.bincount(self.row[self.is_view], minlength=self.row.max(initial=-1) + 1)
        return np.flatnonzero(self.is_view & (views_per_row[self.row] >= 2))


def retrieval_gallery(bench, view_keys, source_keys: Mapping, vectors: Mapping, rows: Sequence[int],
                      dataset_rows: Sequence[int]) -> RetrievalGallery:
    """The `RetrievalGallery` of `rows` of a joined benchmark (keys from `nearid_keys`); images that were
    not embedded are absent. `dataset_rows[row]` is the row's index in the dataset, for the names."""
    items = [(key, row, True, f"positives row {dataset_rows[row]} column {column}")
             for row in rows for column, keys in zip(bench.view_columns, view_keys)
             if (key := keys[row]) is not None and key in vectors]
    items += [(key, row, False, f"source {name} row {dataset_rows[row]} column {column}")
              for name, slots in source_keys.items() for row in rows
              for column, keys in zip(bench.distractor_columns[name], slots)
              if (key := keys[row]) is not None and key in vectors]
    keys, item_rows, is_view, names = (list(values) for values in zip(*items)) if items else ([], [], [], [])
    item_rows, is_view = np.array(item_rows, dtype=np.int64), np.array(is_view, dtype=bool)
    identity = np.where(is_view, item_rows, len(bench) + np.arange(len(item_rows)))  # a distractor: its own
    return RetrievalGallery(embedding_matrix(vectors, keys, vectors.dim)[0], identity, item_rows, is_view, names)


def retrieval_ranking(gallery: RetrievalGallery, chunk: int = 256) -> tuple:
    """(query items [Q], `metrics.retrieval_per_query` over all queries): each query ranks the gallery
    without itself; relevant are the other views of its row."""
    queries = gallery.queries()
    if not len(queries):
        raise ValueError(f"no row has two present views among the {len(gallery.names)} gallery images, so there "
                         "is no retrieval query; evaluate rows with at least two views")
    embeddings = gallery.embeddings.astype(np.float64)
    parts = []
    for start in range(0, len(queries), chunk):  # a [chunk, M] block of similarities at a time
        query = queries[start:start + chunk]
        sims = embeddings[query] @ embeddings.T
        relevant = gallery.identity[query][:, None] == gallery.identity[None, :]
        sims[np.arange(len(query)), query], relevant[np.arange(len(query)), query] = -np.inf, False
        own_distractor = (gallery.row[query][:, None] == gallery.row[None, :]) & ~gallery.is_view[None, :]
        parts.append(metrics.retrieval_per_query(sims, relevant, own_distractor))
    return queries, {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def retrieval_threshold(gallery: RetrievalGallery) -> tuple:
    """(threshold, ARI): the clustering threshold among `clustering.candidate_thresholds` with the best ARI.

    Where the next candidates cut the same clusters, the middle of their range: clusters change only at a
    merge, and none lies between cuts that give the same clusters, so the middle gives them too, as far from
    the merges on either side as the candidates show. A candidate at the edge of such a range can lie right on
    a similarity of the images, where the last bits of the embeddings decide the clusters.
    """
    candidates = clustering.candidate_thresholds(gallery.embeddings)
    linkage = clustering.IdentityLinkage(gallery.embeddings, candidates.min())
    clusters = [linkage.labels(t) for t in candidates]
    aris = [metrics.clustering_scores(gallery.identity, found)["ari"] for found in clusters]
    first = last = int(np.argmax(aris))
    while last + 1 < len(clusters) and np.array_equal(clusters[last + 1], clusters[first]):
        last += 1
    return float(candidates[first] + candidates[last]) / 2, aris[first]


def retrieval_clustering(gallery: RetrievalGallery, threshold: float) -> dict:
    """`metrics.clustering_scores` of the gallery clustered at `threshold`."""
    return metrics.clustering_scores(gallery.identity,
                                     clustering.IdentityLinkage(gallery.embeddings, threshold).labels(threshold))


def retrieval_rows(gallery: RetrievalGallery, queries: np.ndarray, per_query: Mapping, ids: Sequence) -> list:
    """Per query: its image and id, where its first relevant item ranks, its AP, and what ranked first."""
    rows = []
    for i, query in enumerate(queries):
        top = int(per_query["top1"][i])
        kind = ("same identity" if gallery.identity[top] == gallery.identity[query] else
                "own distractor" if per_query["top1_own_distractor"][i] else
                "other view" if gallery.is_view[top] else "other distractor")
        rows.append({"query": gallery.names[query], "id": ids[gallery.row[query]],
                     "first_relevant_rank": int(per_query["first_relevant_rank"][i]),
                     "average_precision": float(per_query["average_precision"][i]),
                     "top1": gallery.names[top], "top1_score": float(per_query["top1_score"][i]), "top1_is": kind})
    return rows


def retrieval_benchmark(bench, view_keys, source_keys: Mapping, vectors: Mapping, test_rows: Sequence[int],
                        val_rows: Sequence[int]) -> tuple:
    """(flat metrics, per-query rows) of near-identity retrieval on the test rows, clustered at the threshold
    chosen on the val rows (on the test rows themselves without any, an optimistic choice that the metrics say).

    `bench` holds the test rows, then the val rows (one selection, so every image has one place);
    `test_rows` / `val_rows` are their indices in the dataset, for the names.
    """
    dataset_rows = [*test_rows, *val_rows]
    test = retrieval_gallery(bench, view_keys, source_keys, vectors, range(len(test_rows)), dataset_rows)
    queries, per_query = retrieval_ranking(test)
    scores = metrics.retrieval_scores(per_query["first_relevant_rank"], per_query["average_precision"],
                                      per_query["top1_own_distractor"])
    val = retrieval_gallery(bench, view_keys, source_keys, vectors, range(len(test_rows), len(bench)),
                            dataset_rows) if val_rows else test
    threshold, threshold_ari = retrieval_threshold(val)
    clusters = retrieval_clustering(test, threshold)
    scores.update(n_gallery=len(test.names), n_views=int(test.is_view.sum()), n_distractors=int((~test.is_view).sum()),
                  cluster_threshold=threshold,
                  cluster_threshold_split="val split" if val_rows else "evaluated rows (no --val-split-file)",
                  cluster_threshold_ari=threshold_ari, cluster_ari=clusters["ari"], cluster_nmi=clusters["nmi"],
                  n_clusters=clusters["n_clusters"], n_identities=clusters["n_identities"])
    ids = bench.ids()
    return scores, retrieval_rows(test, queries, per_query, ids)
