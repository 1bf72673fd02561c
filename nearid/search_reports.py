"""What `search.py` shows of a search index: console summaries, result records and documents, contact sheets.

The index and its searches live in `nearid.search`; this module turns them into what a person
reads: the records of the CSV and JSON outputs, the lines printed after a run, and the cells of the
contact sheets (`nearid.reports.plots.plot_image_grid` draws them), captioned so that the images of one
sheet can be told apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nearid import heatmaps, images
from nearid import search as gallery
from nearid.reports import results_file

# What a contact sheet shows at most: query groups, images of each query group, hits per query, images per cluster.
SHEET_QUERIES, SHEET_QUERY_IMAGES, SHEET_HITS, SHEET_CLUSTER_IMAGES = 16, 3, 10, 40
SHEET_COLUMNS = 8  # images per row of a cluster's sheet

# --- index -----------------------------------------------------------------------------------------


def index_summary(index, report, folder, cache_dir) -> str:
    """What `index` did, in the words of search_index.json: where each embedding came from, what was left out."""
    info = gallery.read_info(folder)
    lines = [f"Indexed {report['images']} images into {folder}: {report['added']} new, {report['removed']} removed. "
             f"Embeddings: {report['embedded']} computed now, {report['from_store']} read from the embed-once store "
             f"({cache_dir}), {report['reused']} kept from the index."]
    if report["skipped"] or report["ignored"]:
        empty = sum(item["reason"] == gallery.EMPTY_CELL for item in report["skipped"])
        parts = ([f"{len(report['skipped']) - empty} unreadable images"]
                 + ([f"{empty} empty dataset cells"] if empty else []) + [f"{len(report['ignored'])} other files"])
        lines.append(f"{', '.join(parts[:-1])} and {parts[-1]} were left out; {folder / 'search_index.json'} lists "
                     f"each with the reason (\"skipped\": {len(info['skipped'])}, \"ignored\": "
                     f"{len(info.get('ignored', []))}).")
    if index.recall is not None:
        lines.append(f"{index.settings.kind} index: recall@10 against exact search {index.recall:.4f}.")
    sizes = info["bytes_per_image"]
    lines.append(f"Bytes per image: {sizes['faiss_index']:.0f} in the FAISS index (held in memory to search), "
                 f"{sizes['gallery']:.0f} in the gallery dataset (memory-mapped).")
    return "\n".join(lines)


# --- query and cluster -----------------------------------------------------------------------------


def results_document(kind: str, index, index_dir, summary: dict, skipped: list) -> dict:
    """The results JSON of a `kind` run ("search-query", "search-cluster") on the index in `index_dir`: the
    index's scorer, and the index folder as the run's data in its provenance."""
    place = {"kind": "search index", "path": str(Path(index_dir).resolve())}
    prov = results_file.provenance(index.scorer, [place])
    return results_file.results_document(kind, index.scorer, summary, prov, skipped)


# --- query -----------------------------------------------------------------------------------------


def hit_records(index: gallery.SearchIndex, result) -> list:
    """One record per hit: its query group, the query images, rank, score and the gallery image's place."""
    entries = index.entries()
    records = []
    for group, (names, scores, rows) in enumerate(zip(result.queries, result.scores, result.rows)):
        for rank, (score, row) in enumerate(zip(scores, rows), start=1):
            if row >= 0:
                entry = entries[row]
                records.append({"query_group": group, "queries": ";".join(names), "rank": rank,
                                "score": float(score), "image": gallery.describe(entry), **entry})
    return records


def missing_files(records) -> list:
    """The gallery files among the hits that are not on disk any more, each once."""
    paths = dict.fromkeys(r["path"] for r in records if r["path"] is not None)
    return [path for path in paths if not Path(path).is_file()]


def query_summary(index, result, records) -> str:
    """The console report of a query: what was clamped or left out, and the best hits of each query group."""
    lines = []
    if result.clamped:
        lines.append(f"k = {result.requested_k} is more than the gallery's {len(index)} images: all {result.k} are "
                     "returned.")
    if result.skipped:
        lines.append(f"{len(result.skipped)} query images or files were left out; query_results.json lists each.")
    for group in range(min(len(result.queries), SHEET_QUERIES)):
        best = [f"{_caption(r['image'])} {r['score']:.3f}" for r in records if r["query_group"] == group][:3]
        lines.append(f"{'; '.join(_caption(n) for n in result.queries[group][:3])} -> {', '.join(best)}")
    return "\n".join(lines)


def _thumb(load):
    """A thumbnail of `load()`, or None when the image cannot be read any more (a moved file)."""
    try:
        return gallery.thumbnail(load())
    except (OSError, ValueError):
        return None


def _caption(name: str, width: int = 24) -> str:
    """The file and its folder (a subject, often), cut from the left to fit one console column."""
    name = "/".join(Path(name).parts[-2:])
    return name if len(name) <= width else "\u2026" + name[1 - width:]


def sheet_captions(names: list, width: int = 24, max_lines: int = 4) -> dict:
    """{name: caption} that tell the images of one contact sheet apart: each path without the folders all of
    them share (a lone image keeps its two nearest folders), wrapped at '/' and spaces into at most
    `max_lines` lines of about `width` characters. What still does not fit loses its start: the file and the
    folders nearest it (subject, method) are what tells images apart."""
    parts = {name: Path(name).parts for name in names}
    shortest = min((len(p) for p in parts.values()), default=1)
    start = len(os.path.commonprefix(list(parts.values()))) if len(set(names)) > 1 else shortest - 3
    return {name: _wrap(list(p[max(0, min(start, shortest - 1)):]), width, max_lines) for name, p in parts.items()}


def _wrap(parts: list, width: int, max_lines: int) -> str:
    tokens = [word for index, part in enumerate(parts) for word in
              (part + ("/" if index < len(parts) - 1 else "")).replace(" ", " \0").split("\0")]
    lines = [""]
    for token in reversed(tokens):  # from the file backwards
        if lines[0] and len(token.rstrip()) + len(lines[0]) > width:
            lines.insert(0, "")
        lines[0] = token + lines[0]
    lines = [line.rstrip() for line in lines]
    if len(lines) > max_lines:
        lines = lines[-max_lines:]
        lines[0] = "\u2026" + lines[0]
    return "\n".join(line if len(line) <= width + 1 else "\u2026" + line[-width:] for line in lines)


def query_sheet(index, result, heatmap_scorer=None) -> list:
    """One row per query group: its query images (with their attention map when `heatmap_scorer` is given), then
    its top hits with their scores."""
    entries = index.entries()
    groups = list(zip(result.queries, result.scores, result.rows))[:SHEET_QUERIES]
    captions = sheet_captions([n for names, _, _ in groups for n in names[:SHEET_QUERY_IMAGES]]
                              + [gallery.describe(entries[r]) for _, _, found in groups for r in found[:SHEET_HITS]
                                 if r >= 0])
    rows = []
    for names, scores, found in groups:
        shown = names[:SHEET_QUERY_IMAGES]
        if heatmap_scorer is None:
            cells = [(_thumb(lambda n=n: images.load_image(n)), f"query\n{captions[n]}") for n in shown]
        else:
            attention = heatmaps.attention_map(heatmaps.nearid_head(heatmap_scorer),
                                               heatmaps.image_tokens(heatmap_scorer, shown))
            cells = [(heatmaps.overlay(images.load_image(n), a, size=128), f"query, attention\n{captions[n]}")
                     for n, a in zip(shown, attention)]
        cells += [(_thumb(lambda r=r: index.image(r)), f"#{rank} {score:.3f}\n{captions[gallery.describe(entries[r])]}")
                  for rank, (score, r) in enumerate(zip(scores[:SHEET_HITS], found), start=1) if r >= 0]
        rows.append(cells)
    return rows


# --- cluster ---------------------------------------------------------------------------------------


def cluster_records(index, clusters, duplicates) -> list:
    """One record per gallery image: its cluster, the cluster's size, its near-duplicate group (None when alone)."""
    cluster_sizes, duplicate_sizes = np.bincount(clusters), np.bincount(duplicates)
    return [{"cluster": int(c), "cluster_size": int(cluster_sizes[c]),
             "near_duplicate_group": int(d) if duplicate_sizes[d] > 1 else None, "image": gallery.describe(entry),
             **entry}
            for c, d, entry in zip(clusters, duplicates, index.entries())]


def cluster_summary(clusters, duplicates, threshold: float, duplicate_threshold: float) -> dict:
    sizes, duplicate_sizes = np.bincount(clusters), np.bincount(duplicates)
    return {"threshold": threshold, "duplicate_threshold": duplicate_threshold, "n_images": len(clusters),
            "n_clusters": len(sizes), "n_singletons": int((sizes == 1).sum()), "largest_cluster": int(sizes.max()),
            "n_near_duplicate_groups": int((duplicate_sizes > 1).sum()),
            "n_images_in_near_duplicate_groups": int(duplicate_sizes[duplicate_sizes > 1].sum())}


def members(labels) -> list:
    """The gallery rows of every label 0, 1, ... (labels are numbered by size: the largest first)."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels))[:-1])


def label_groups(labels, entries, min_size: int = 2) -> list:
    """[{"group", "size", "images"}] of the labels with at least `min_size` images, largest first."""
    return [{"group": group, "size": len(rows), "images": [gallery.describe(entries[row]) for row in rows]}
            for group, rows in enumerate(members(labels)) if len(rows) >= min_size]


def large_clusters(clusters, min_size: int) -> list:
    """[(cluster, its gallery rows)] of the clusters with at least `min_size` images, largest first."""
    return [(group, rows) for group, rows in enumerate(members(clusters)) if len(rows) >= min_size]


def cluster_sheet(index, rows) -> list:
    """The cells of one cluster's contact sheet, `SHEET_COLUMNS` to a row: its first images, captioned."""
    entries = index.entries()
    shown = rows[:SHEET_CLUSTER_IMAGES]
    captions = sheet_captions([gallery.describe(entries[r]) for r in shown])
    cells = [(_thumb(lambda r=r: index.image(r)), captions[gallery.describe(entries[r])]) for r in shown]
    return [cells[i:i + SHEET_COLUMNS] for i in range(0, len(cells), SHEET_COLUMNS)]
