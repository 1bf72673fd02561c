"""Identity search over your images: index a gallery, query it, and cluster it by identity.

    python search.py index --model SCORER --images DIR [DIR ...] --index-dir INDEX
    python search.py index --model SCORER --dataset SRC --column image [image2 ...] --index-dir INDEX
    python search.py query --index-dir INDEX --images QUERY [QUERY ...] [--k 10] [--combine each|mean|max]
    python search.py cluster --index-dir INDEX [--threshold 0.8] [--duplicate-threshold 0.95]

SCORER is any scorer evaluate.py accepts: a NearID model (Hub id or folder) or a baseline as
KIND:MODEL. Images are decoded and embedded as in evaluate.py, once each, through the embed-once
store (--cache-dir). Indexing again embeds only new images, and files that are gone leave the
index; an interrupted run resumes where it stopped, and the index folder is replaced only when the
new one is complete. `index` runs under torchrun / accelerate launch on several processes, with
the index of one process. `query` embeds the queries with the index's own scorer (another model is
refused) and writes CSV, JSON and a contact sheet; `cluster` groups the gallery by identity
(average linkage on cosine distance) and lists near-duplicates. Run `python search.py COMMAND --help`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nearid.commands.evaluate import HINTS, Arguments, EmbeddingArguments, ModelArguments, fill_options, load_scorer
from nearid import data, heatmaps, reports
from nearid.ann import INDEX_KINDS, IndexSettings
from nearid.cli import REQUIRED, DatasetSource, build_parser, option, parse, save_arguments, user_errors
from nearid.clustering import IdentityLinkage
from nearid.images import load_image
from nearid.io import write_csv
from nearid.scorers import parse_spec, pinned_spec, resolve_device
from nearid.search import (
    COMBINE,
    EMPTY_CELL,
    INFO_FILE,
    DatasetColumn,
    Embedder,
    SearchIndex,
    SearchIndexMismatch,
    check_replaceable,
    describe,
    one_writer_of,
    read_info,
    thumbnail,
)

SHEET_QUERIES, SHEET_QUERY_IMAGES, SHEET_HITS, SHEET_CLUSTER_IMAGES = 16, 3, 10, 40

# --- arguments -------------------------------------------------------------------------------------


@dataclass
class IndexArguments:
    """The gallery and its index"""

    index_dir: str = option(REQUIRED, "folder of the search index (created, or brought up to date)", folder=True)
    images: list[str] = option([], "image files or folders (searched recursively) that make up the gallery")
    dataset: str | None = option(None, "a dataset whose image column makes up the gallery: Hub id (SRC@REVISION pins "
                                       "one), save_to_disk folder or parquet")
    column: list[str] = option(["image"], "image column(s) of --dataset")
    split: str = option("train", "split of --dataset")
    index_type: str = option("exact", "exact inner-product search, or an approximate index for large galleries "
                                      "(its recall@10 against exact search is measured and reported)",
                             choices=INDEX_KINDS)
    nlist: int | None = option(None, "ivf: inverted lists (default 4 sqrt(N), at most N / 39)", min=1)
    nprobe: int = option(32, "ivf: lists visited per query (more: higher recall, slower)", min=1)
    hnsw_m: int = option(32, "hnsw: links per image", min=4)
    ef_search: int = option(128, "hnsw: candidates per query (more: higher recall, slower)", min=1)
    overwrite: bool = option(False, "replace an index of --index-dir that was built with another scorer")


@dataclass
class IndexedModelArguments(ModelArguments):
    """The scorer (default: the index's own)"""

    model: str | None = option(None, "scorer that embeds the query images; default: the one the index was built "
                                     "with, with its revision and dtype (another model, preprocessing or dimension "
                                     "is refused)")


@dataclass
class QueryArguments:
    """The query"""

    index_dir: str = option(REQUIRED, "folder of the search index")
    images: list[str] = option(REQUIRED, "query image files or folders (searched recursively)")
    k: int = option(10, "gallery images returned per query (the whole gallery when it has fewer)", min=1)
    combine: str = option("each", "each: every query image on its own; mean: one query, the mean of their embeddings "
                                  "(re-normalised); max: one query, each gallery image's best similarity to any",
                          choices=COMBINE)
    heatmap: bool = option(False, "draw each query image in the contact sheet with its attention map overlaid (where "
                                  "the NearID head looks; docs/method.md); NearID models only, one backbone pass "
                                  "per query image shown")


@dataclass
class ClusterArguments:
    """Clustering by identity"""

    index_dir: str = option(REQUIRED, "folder of the search index")
    threshold: float = option(0.8, "images join one cluster while their average cosine similarity is at least this "
                                   "(`evaluate.py retrieval` reports the threshold that fits NearID's val split)",
                              min=-1.0, max=1.0)
    duplicate_threshold: float = option(0.95, "near-duplicates: the groups at this higher threshold", min=-1.0,
                                        max=1.0)
    sheet_min_size: int = option(4, "clusters with at least this many images get a contact sheet", min=2)
    max_sheets: int = option(20, "contact sheets written at most (largest clusters first)", min=0)

    def __post_init__(self):
        if self.duplicate_threshold < self.threshold:
            raise ValueError(f"--duplicate-threshold {self.duplicate_threshold} is below --threshold {self.threshold}: "
                             "near-duplicates are groups closer than the identity clusters, so give a "
                             f"--duplicate-threshold of at least {self.threshold}")


@dataclass
class SearchOutputArguments:
    """Outputs"""

    output_dir: str = option("search_outputs", "folder for the results; files of an earlier run of the same command "
                                               "are replaced", folder=True)


COMMANDS = {
    "index": ("embed a folder or dataset column into a search index",
              "Embed image files and folders (recursively) or a dataset's image column into a search index: a "
              "datasets Dataset (path or row, content hash, float16 embedding) with a FAISS index. Re-running "
              "embeds only new images; files that are gone leave the index.",
              (IndexArguments, ModelArguments, EmbeddingArguments)),
    "query": ("the top-k gallery images of query images",
              "The top-k gallery images of query images, by cosine similarity. Writes query_results.json (last), "
              "query_results.csv and query_contact_sheet.png.",
              (QueryArguments, IndexedModelArguments, EmbeddingArguments, SearchOutputArguments)),
    "cluster": ("group the gallery by identity, and find near-duplicates",
                "Average-linkage clustering on cosine distance, cut at 1 - threshold, and the near-duplicate groups "
                "at a higher threshold. Writes cluster_results.json (last), clusters.csv and "
                "cluster_sheets/cluster_NNNN.png for the large clusters.",
                (ClusterArguments, SearchOutputArguments)),
}


def embedder(args, state) -> Embedder:
    scorer = load_scorer(args, state)
    return Embedder(scorer, args.cache_dir, fill_options(args, scorer), state)


# --- index -----------------------------------------------------------------------------------------


def gallery_sources(args) -> tuple:
    """(files and folders, [DatasetColumn]) of the gallery, with the dataset's provenance."""
    if not args.images and not args.dataset:
        raise ValueError("index needs a gallery: --images FILES_OR_FOLDERS and/or --dataset SRC --column COLUMN")
    if not args.dataset:
        return args.images, [], []
    source = DatasetSource.parse(args.dataset)
    dataset, provenance = data.open_dataset(source, args.split)
    data.require_columns(dataset, args.column, f"dataset {args.dataset}")
    return args.images, [DatasetColumn(str(source), dataset, column, args.split) for column in args.column], [provenance]


def open_or_create(args, embedder_: Embedder) -> SearchIndex:
    """The index of --index-dir, or a new one; one built by another scorer is refused unless --overwrite."""
    settings = IndexSettings(args.index_type, args.nlist, args.nprobe, args.hnsw_m, ef_search=args.ef_search)
    folder = Path(args.index_dir)
    check_replaceable(folder)  # before anything is embedded
    if not (folder / INFO_FILE).is_file() or args.overwrite:
        return SearchIndex.create(embedder_, settings)
    try:
        index = SearchIndex.load(folder, embedder_)
    except SearchIndexMismatch as error:
        raise SearchIndexMismatch(f"{error} Or pass --overwrite to replace it.") from None
    index.use(settings)
    return index


def run_index(args, state):
    images, columns, dataset_provenance = gallery_sources(args)
    embedder_ = embedder(args, state)
    # One run at a time, from loading the index to saving it: a second run waits, then builds on this one's index.
    with one_writer_of(args.index_dir, state):
        index = open_or_create(args, embedder_)
        report = index.sync(images, columns)
        if not state.is_main_process:
            return report
        prov = reports.provenance(embedder_.scorer.provenance(), dataset_provenance, extra={"last_update": report})
        folder = index.save(args.index_dir, {"provenance": prov})
        save_arguments(folder / "index_args.json", "search.py index", *args.groups.values())
    print(index_summary(index, report, folder))
    return {**report, "index": str(folder), "recall_at_10": index.recall}


def index_summary(index, report, folder) -> str:
    info = read_info(folder)
    lines = [f"Indexed {report['images']} images into {folder}: {report['added']} new, {report['removed']} removed, "
             f"{report['embedded']} embedded, {report['reused']} reused from the index."]
    empty = sum(item["reason"] == EMPTY_CELL for item in report["skipped"])
    counts = {"unreadable images": len(report["skipped"]) - empty, "empty dataset cells": empty,
              "other files": len(report["ignored"])}
    left_out = [f"{count} {what}" for what, count in counts.items() if count]
    if left_out:
        listed = ", ".join(left_out[:-1]) + " and " + left_out[-1] if len(left_out) > 1 else left_out[0]
        lines.append(f"{listed} were left out; {folder / 'search_index.json'} lists each with the reason.")
    if index.recall is not None:
        lines.append(f"{index.settings.kind} index: recall@10 against exact search {index.recall:.4f}.")
    sizes = info["bytes_per_image"]
    lines.append(f"Bytes per image: {sizes['faiss_index']:.0f} in the FAISS index (held in memory to search), "
                 f"{sizes['gallery']:.0f} in the gallery dataset (memory-mapped).")
    return "\n".join(lines)


# --- query -----------------------------------------------------------------------------------------


def run_query(args, state):
    scorer = read_info(Path(args.index_dir))["scorer"]  # a missing index stops the run before a model loads
    if args.model is None:  # the index's own scorer embeds the queries: the same folder, or the same commit
        (args.model, args.revision), args.dtype = pinned_spec(scorer), scorer["dtype"]
    if args.heatmap and parse_spec(args.model)[0] != "nearid":
        raise ValueError(f"--heatmap draws the NearID head's attention, but the queries are embedded by "
                         f"{args.model}, a '{parse_spec(args.model)[0]}' baseline; drop --heatmap")
    query_embedder = embedder(args, state)
    index = SearchIndex.load(args.index_dir, query_embedder)
    result = index.search(args.images, args.k, args.combine)
    if not state.is_main_process:
        return None
    records = hit_records(index, result)
    write_query_outputs(args, index, result, records, query_embedder.scorer if args.heatmap else None)
    return {"result": result, "records": records}


def hit_records(index: SearchIndex, result) -> list:
    entries = index.entries()
    records = []
    for group, (names, scores, rows) in enumerate(zip(result.queries, result.scores, result.rows)):
        for rank, (score, row) in enumerate(zip(scores, rows), start=1):
            if row >= 0:
                entry = entries[row]
                records.append({"query_group": group, "queries": ";".join(names), "rank": rank,
                                "score": float(score), "image": describe(entry), **entry})
    return records


def write_query_outputs(args, index, result, records, heatmap_scorer=None):
    outputs = reports.RunOutputs(args.output_dir, "query_results.json")
    save_arguments(outputs.path("query_args.json"), "search.py query", *args.groups.values())
    write_csv(outputs.path("query_results.csv"), records)
    gone = missing_files(records)
    if gone:
        outputs.warn(f"{len(gone)} of the hits are gallery files that no longer exist (deleted or moved since the "
                     f"index was built): {', '.join(gone[:5])}{', ...' if len(gone) > 5 else ''}. Run `python "
                     "search.py index` on the gallery again to bring the index up to date.")
    overlaid = "; queries with the attention map of the head" if heatmap_scorer else ""
    outputs.optional("drawing query_contact_sheet.png", reports.plot_image_grid,
                     outputs.path("query_contact_sheet.png"), query_sheet(index, result, heatmap_scorer),
                     f"Top {min(result.k, SHEET_HITS)} gallery images per query ({args.combine}){overlaid}\n"
                     f"{index.scorer['spec']}")
    summary = {"k": result.k, "requested_k": result.requested_k, "combine": args.combine,
               "n_query_groups": len(result.queries), "n_gallery": len(index)}
    prov = reports.provenance(index.scorer, [{"kind": "search index", "path": str(Path(args.index_dir).resolve())}])
    document = reports.results_document("search-query", index.scorer, summary, prov, result.skipped)
    outputs.finish({**document, "results": [{key: r[key] for key in ("query_group", "queries", "rank", "score",
                                                                       "image", "hash")} for r in records]})
    print_query_summary(index, result, records)
    print(f"Results in {outputs.folder}")


def missing_files(records) -> list:
    """The gallery files among the hits that are not on disk any more, each once."""
    paths = dict.fromkeys(r["path"] for r in records if r["path"] is not None)
    return [path for path in paths if not Path(path).is_file()]


def print_query_summary(index, result, records):
    if result.clamped:
        print(f"k = {result.requested_k} is more than the gallery's {len(index)} images: all {result.k} are returned.")
    if result.skipped:
        print(f"{len(result.skipped)} query images or files were left out; query_results.json lists each.")
    for group in range(min(len(result.queries), SHEET_QUERIES)):
        best = [f"{_caption(r['image'])} {r['score']:.3f}" for r in records if r["query_group"] == group][:3]
        print(f"{'; '.join(_caption(n) for n in result.queries[group][:3])} -> {', '.join(best)}")


def _thumb(load):
    """A thumbnail of `load()`, or None when the image cannot be read any more (a moved file)."""
    try:
        return thumbnail(load())
    except (OSError, ValueError):
        return None


def _caption(name: str, width: int = 24) -> str:
    """The file and its folder (a subject, often), cut from the left to fit under a thumbnail."""
    name = "/".join(Path(name).parts[-2:])
    return name if len(name) <= width else "\u2026" + name[1 - width:]


def query_sheet(index, result, heatmap_scorer=None) -> list:
    """One row per query group: its query images (with their attention map when `heatmap_scorer` is given), then
    its top hits with their scores."""
    entries = index.entries()
    rows = []
    for names, scores, found in list(zip(result.queries, result.scores, result.rows))[:SHEET_QUERIES]:
        shown = names[:SHEET_QUERY_IMAGES]
        if heatmap_scorer is None:
            cells = [(_thumb(lambda n=n: load_image(n)), f"query\n{_caption(n)}") for n in shown]
        else:
            attention = heatmaps.attention_map(heatmaps.nearid_head(heatmap_scorer),
                                               heatmaps.image_tokens(heatmap_scorer, shown))
            cells = [(heatmaps.overlay(load_image(n), a, size=128), f"query, attention\n{_caption(n)}")
                     for n, a in zip(shown, attention)]
        cells += [(_thumb(lambda r=r: index.image(r)), f"#{rank} {score:.3f}\n{_caption(describe(entries[r]))}")
                  for rank, (score, r) in enumerate(zip(scores[:SHEET_HITS], found), start=1) if r >= 0]
        rows.append(cells)
    return rows


# --- cluster ---------------------------------------------------------------------------------------


def run_cluster(args, state):
    if not state.is_main_process:
        return None
    index = SearchIndex.load(args.index_dir)
    linkage = IdentityLinkage(index.finite_vectors(), args.threshold)  # cut again at the higher duplicate threshold
    clusters, duplicates = linkage.labels(args.threshold), linkage.labels(args.duplicate_threshold)
    entries = index.entries()
    cluster_sizes, duplicate_sizes = np.bincount(clusters), np.bincount(duplicates)
    records = [{"cluster": int(c), "cluster_size": int(cluster_sizes[c]),
                "near_duplicate_group": int(d) if duplicate_sizes[d] > 1 else None, "image": describe(entry), **entry}
               for c, d, entry in zip(clusters, duplicates, entries)]
    summary = cluster_summary(args, clusters, duplicates)
    write_cluster_outputs(args, index, records, clusters, duplicates, summary)
    return {"summary": summary, "records": records}


def cluster_summary(args, clusters, duplicates) -> dict:
    sizes, duplicate_sizes = np.bincount(clusters), np.bincount(duplicates)
    return {"threshold": args.threshold, "duplicate_threshold": args.duplicate_threshold, "n_images": len(clusters),
            "n_clusters": len(sizes), "n_singletons": int((sizes == 1).sum()), "largest_cluster": int(sizes.max()),
            "n_near_duplicate_groups": int((duplicate_sizes > 1).sum()),
            "n_images_in_near_duplicate_groups": int(duplicate_sizes[duplicate_sizes > 1].sum())}


def members(labels) -> list:
    """The gallery rows of every label 0, 1, ... (labels are numbered by size: the largest first)."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels))[:-1])


def label_groups(labels, entries, min_size: int = 2) -> list:
    """[{"group", "size", "images"}] of the labels with at least `min_size` images, largest first."""
    return [{"group": group, "size": len(rows), "images": [describe(entries[row]) for row in rows]}
            for group, rows in enumerate(members(labels)) if len(rows) >= min_size]


def write_cluster_outputs(args, index, records, clusters, duplicates, summary):
    outputs = reports.RunOutputs(args.output_dir, "cluster_results.json")
    save_arguments(outputs.path("cluster_args.json"), "search.py cluster", *args.groups.values())
    write_csv(outputs.path("clusters.csv"), records)
    entries = index.entries()
    large = [(group, rows) for group, rows in enumerate(members(clusters)) if len(rows) >= args.sheet_min_size]
    for group, rows in large[:args.max_sheets]:
        cells = [(_thumb(lambda r=r: index.image(r)), _caption(describe(entries[r])))
                 for r in rows[:SHEET_CLUSTER_IMAGES]]
        name = f"cluster_sheets/cluster_{group:04d}.png"
        outputs.optional(f"drawing {name}", reports.plot_image_grid, outputs.path(name),
                         [cells[i:i + 8] for i in range(0, len(cells), 8)],
                         f"Cluster {group}: {len(rows)} images at similarity >= {args.threshold}\n"
                         f"{index.scorer.get('spec')}")
    prov = reports.provenance(index.scorer, [{"kind": "search index", "path": str(Path(args.index_dir).resolve())}])
    document = reports.results_document("search-cluster", index.scorer, summary, prov, [])
    outputs.finish({**document, "clusters": label_groups(clusters, entries),
                    "near_duplicates": label_groups(duplicates, entries)})
    print(f"{summary['n_images']} images in {summary['n_clusters']} clusters at similarity >= {args.threshold} "
          f"(largest {summary['largest_cluster']}, {summary['n_singletons']} single images); "
          f"{summary['n_near_duplicate_groups']} near-duplicate groups at >= {args.duplicate_threshold} hold "
          f"{summary['n_images_in_near_duplicate_groups']} images. Results in {outputs.folder}")


# --- command line ----------------------------------------------------------------------------------

RUNS = {"index": run_index, "query": run_query, "cluster": run_cluster}


def main(argv=None):
    parser = build_parser("search.py", __doc__, commands=COMMANDS)
    command, groups, debug = parse(parser, {name: spec[2] for name, spec in COMMANDS.items()}, argv)
    args = Arguments(command, groups)
    with user_errors(debug, HINTS):
        from accelerate import PartialState

        # cpu=True joins the processes of a CPU launch (gloo), as in evaluate.py.
        state = PartialState(cpu=resolve_device(getattr(args, "device", "cpu")) == "cpu")
        return RUNS[command](args, state)


if __name__ == "__main__":
    main(sys.argv[1:])
