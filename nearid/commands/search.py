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

from nearid.ann import INDEX_KINDS, IndexSettings
from nearid.cli import REQUIRED, DatasetSource, build_parser, lazy_module, option, parse, save_arguments, user_errors
from nearid.clustering import IdentityLinkage
from nearid.io import write_csv
from nearid.options import (
    HINTS,
    Arguments,
    EmbeddingArguments,
    ScorerArguments,
    fill_options,
    load_scorer,
    open_outputs,
    process_state,
)
from nearid.reports import plots, results_file

# torch, transformers, datasets and faiss come with these: loaded when a run first uses them, not for --help.
readers, scorers, gallery, shown = (lazy_module(f"nearid.{name}") for name in
                                    ("data.readers", "scorers", "search", "search_reports"))
COMBINE = ("each", "mean", "max")  # nearid.search.COMBINE (a test keeps them equal), for --combine's choices

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
class IndexedScorerArguments(ScorerArguments):
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
              (IndexArguments, ScorerArguments, EmbeddingArguments)),
    "query": ("the top-k gallery images of query images",
              "The top-k gallery images of query images, by cosine similarity. Writes query_results.json (last), "
              "query_results.csv and query_contact_sheet.png.",
              (QueryArguments, IndexedScorerArguments, EmbeddingArguments, SearchOutputArguments)),
    "cluster": ("group the gallery by identity, and find near-duplicates",
                "Average-linkage clustering on cosine distance, cut at 1 - threshold, and the near-duplicate groups "
                "at a higher threshold. Writes cluster_results.json (last), clusters.csv and "
                "cluster_sheets/cluster_NNNN.png for the large clusters.",
                (ClusterArguments, SearchOutputArguments)),
}


def embedder(args, state) -> gallery.Embedder:
    scorer = load_scorer(args, state)
    return gallery.Embedder(scorer, args.cache_dir, fill_options(args, scorer), state)


# --- index -----------------------------------------------------------------------------------------


def gallery_sources(args) -> tuple:
    """(files and folders, [DatasetColumn]) of the gallery, with the dataset's provenance."""
    if not args.images and not args.dataset:
        raise ValueError("index needs a gallery: --images FILES_OR_FOLDERS and/or --dataset SRC --column COLUMN")
    if not args.dataset:
        return args.images, [], []
    source = DatasetSource.parse(args.dataset)
    dataset, provenance = readers.open_dataset(source, args.split)
    readers.require_columns(dataset, args.column, f"dataset {args.dataset}")
    columns = [gallery.DatasetColumn(str(source), dataset, column, args.split) for column in args.column]
    return args.images, columns, [provenance]


def open_or_create(args, embedder_: gallery.Embedder) -> gallery.SearchIndex:
    """The index of --index-dir, or a new one; one built by another scorer is refused unless --overwrite."""
    settings = IndexSettings(args.index_type, args.nlist, args.nprobe, args.hnsw_m, ef_search=args.ef_search)
    folder = Path(args.index_dir)
    gallery.check_replaceable(folder)  # before anything is embedded
    if not (folder / gallery.INFO_FILE).is_file() or args.overwrite:
        return gallery.SearchIndex.create(embedder_, settings)
    try:
        index = gallery.SearchIndex.load(folder, embedder_)
    except gallery.SearchIndexMismatch as error:
        raise gallery.SearchIndexMismatch(f"{error} Or pass --overwrite to replace it.") from None
    index.use(settings)
    return index


def run_index(args, state):
    images, columns, dataset_provenance = gallery_sources(args)
    embedder_ = embedder(args, state)
    # One run at a time, from loading the index to saving it: a second run waits, then builds on this one's index.
    with gallery.one_writer_of(args.index_dir, state):
        index = open_or_create(args, embedder_)
        report = index.sync(images, columns)
        if not state.is_main_process:
            return report
        prov = results_file.provenance(embedder_.scorer.provenance(), dataset_provenance, extra={"last_update": report})
        folder = index.save(args.index_dir, {"provenance": prov, "ignored": report["ignored"]})
        save_arguments(folder / "index_args.json", "search.py index", *args.groups.values())
    print(shown.index_summary(index, report, folder, args.cache_dir))
    return {**report, "index": str(folder), "recall_at_10": index.recall}


# --- query -----------------------------------------------------------------------------------------


def run_query(args, state):
    scorer = gallery.read_info(Path(args.index_dir))["scorer"]  # a missing index stops the run before a model loads
    if args.model is None:  # the index's own scorer embeds the queries: the same folder, or the same commit
        (args.model, args.revision), args.dtype = scorers.pinned_spec(scorer), scorer["dtype"]
    if args.heatmap and scorers.parse_spec(args.model)[0] != "nearid":
        raise ValueError(f"--heatmap draws the NearID head's attention, but the queries are embedded by "
                         f"{args.model}, a '{scorers.parse_spec(args.model)[0]}' baseline; drop --heatmap")
    query_embedder = embedder(args, state)
    index = gallery.SearchIndex.load(args.index_dir, query_embedder)
    result = index.search(args.images, args.k, args.combine)
    if not state.is_main_process:
        return None
    records = shown.hit_records(index, result)
    write_query_outputs(args, index, result, records, query_embedder.scorer if args.heatmap else None)
    return {"result": result, "records": records}


def write_query_outputs(args, index, result, records, heatmap_scorer=None):
    outputs = open_outputs(args, "search.py")
    write_csv(outputs.path("query_results.csv"), records)
    gone = shown.missing_files(records)
    if gone:
        outputs.warn(f"{len(gone)} of the hits are gallery files that no longer exist (deleted or moved since the "
                     f"index was built): {', '.join(gone[:5])}{', ...' if len(gone) > 5 else ''}. Run `python "
                     "search.py index` on the gallery again to bring the index up to date.")
    overlaid = "; queries with the attention map of the head" if heatmap_scorer else ""
    outputs.optional("drawing query_contact_sheet.png", plots.plot_image_grid,
                     outputs.path("query_contact_sheet.png"), shown.query_sheet(index, result, heatmap_scorer),
                     f"Top {min(result.k, shown.SHEET_HITS)} gallery images per query ({args.combine}){overlaid}\n"
                     f"{index.scorer['spec']}")
    summary = {"k": result.k, "requested_k": result.requested_k, "combine": args.combine,
               "n_query_groups": len(result.queries), "n_gallery": len(index)}
    index_place = {"kind": "search index", "path": str(Path(args.index_dir).resolve())}
    prov = results_file.provenance(index.scorer, [index_place])
    document = results_file.results_document("search-query", index.scorer, summary, prov, result.skipped)
    outputs.finish({**document, "results": [{key: r[key] for key in ("query_group", "queries", "rank", "score",
                                                                       "image", "hash")} for r in records]})
    print(shown.query_summary(index, result, records))
    print(f"Results in {outputs.folder}")


# --- cluster ---------------------------------------------------------------------------------------


def run_cluster(args, state):
    if not state.is_main_process:
        return None
    index = gallery.SearchIndex.load(args.index_dir)
    linkage = IdentityLinkage(index.finite_vectors(), args.threshold)  # cut again at the higher duplicate threshold
    clusters, duplicates = linkage.labels(args.threshold), linkage.labels(args.duplicate_threshold)
    records = shown.cluster_records(index, clusters, duplicates)
    summary = shown.cluster_summary(clusters, duplicates, args.threshold, args.duplicate_threshold)
    write_cluster_outputs(args, index, records, clusters, duplicates, summary)
    return {"summary": summary, "records": records}


def write_cluster_outputs(args, index, records, clusters, duplicates, summary):
    outputs = open_outputs(args, "search.py")
    write_csv(outputs.path("clusters.csv"), records)
    for group, rows in shown.large_clusters(clusters, args.sheet_min_size)[:args.max_sheets]:
        name = f"cluster_sheets/cluster_{group:04d}.png"
        outputs.optional(f"drawing {name}", plots.plot_image_grid, outputs.path(name),
                         shown.cluster_sheet(index, rows),
                         f"Cluster {group}: {len(rows)} images at similarity >= {args.threshold}\n"
                         f"{index.scorer.get('spec')}")
    index_place = {"kind": "search index", "path": str(Path(args.index_dir).resolve())}
    prov = results_file.provenance(index.scorer, [index_place])
    document = results_file.results_document("search-cluster", index.scorer, summary, prov, [])
    entries = index.entries()
    outputs.finish({**document, "clusters": shown.label_groups(clusters, entries),
                    "near_duplicates": shown.label_groups(duplicates, entries)})
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
        state = process_state(getattr(args, "device", "cpu"))
        return RUNS[command](args, state)


if __name__ == "__main__":
    main(sys.argv[1:])
