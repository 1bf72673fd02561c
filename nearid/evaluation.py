"""Evaluation building blocks shared by `evaluate.py`, training's validation, scoring and search.

- `embed_images`: a scorer and the unique images of a run (`ImageIndex`) -> embeddings from the
  embed-once store (each image computed once, ever), the images left out and what was computed.
- `VectorTable`, `embedding_matrix`, `slot_embeddings`: embeddings by image key, stacked into the
  arrays the metrics take (a missing image is a zero row with presence False, never compacted).
- The NearID benchmark (`nearid_keys`, `nearid_margins_by_source`, `nearid_summary`,
  `nearid_rows`), MTG (`mtg_keys`, `mtg_oracles`, `mtg_similarities`, `mtg_rows`) and DreamBench++
  from images (`dreambench_pairs_index`, `dreambench_scores`): keys in, metric inputs out; the
  metrics themselves are `nearid.metrics`'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nearid import data, metrics
from nearid.images import ImageLoadError
from nearid.store import FillOptions, ImageIndex, fill

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
    store, report = fill(Path(cache_dir) / scorer.fingerprint, scorer.fingerprint, scorer.format, index,
                         scorer.loader, scorer, options, state)
    keys = [key for key in index if key in store]
    if not keys and not allow_none:
        raise ImageLoadError(f"none of the {len(index)} images could be embedded; for example: "
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


def nearid_keys(bench, index: ImageIndex) -> tuple:
    """Image keys of a joined benchmark: views [3][rows] and distractors {source: [3][rows]}."""
    views = [index.add_column("positives", bench.positives, column) for column in bench.view_columns]
    sources = {name: [index.add_column(f"source {name}", bench.sources[name], column) for column in columns]
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
    columns = [f"image_{view}_{kind}_mask" for view in (1, 2) for kind in ("object", "part")]
    refs = {c: data.image_refs(dataset, c, range(len(dataset))) for c in columns}
    oracles, skipped = np.full((len(dataset), 2), np.nan), []
    for row in range(len(dataset)):
        for view in (1, 2):
            where = f"MTG row {row} view {view}"
            try:
                masks = data.mtg_masks(refs[f"image_{view}_object_mask"][row], refs[f"image_{view}_part_mask"][row],
                                       where)
                oracles[row, view - 1] = metrics.mtg_oracle(*masks)
            except ValueError as error:  # ImageLoadError (names `where` itself), or an empty object mask
                reason = str(error) if isinstance(error, ImageLoadError) else f"{where}: {error}"
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
        triples = data.dreambench_pairs(samples, method)
        pairs[method] = ([k for k, _, _ in triples], index.add_files([s for _, s, _ in triples]),
                         index.add_files([t for _, _, t in triples]))
    return pairs


def dreambench_scores(pairs: Mapping, vectors: Mapping) -> dict:
    """{method: {key: 100 x cosine}} of every pair whose two images were embedded."""
    return {method: {k: float(100 * np.dot(vectors[s], vectors[t]))
                     for k, s, t in zip(keys, src, tgt) if s in vectors and t in vectors}
            for method, (keys, src, tgt) in pairs.items()}
