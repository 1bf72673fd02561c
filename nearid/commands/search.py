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

from nearid.ann import INDEX_KINDS
from nearid.cli import REQUIRED, build_parser, lazy_module, option, parse, user_errors
from nearid.options import HINTS, Arguments, EmbeddingArguments, ScorerArguments, process_state

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


# --- command line ----------------------------------------------------------------------------------

# The library module that runs each command (`nearid.search_runs.<command>.run`).
RUNS = {command: lazy_module(f"nearid.search_runs.{command}") for command in COMMANDS}


def main(argv=None):
    parser = build_parser("search.py", __doc__, commands=COMMANDS)
    command, groups, debug = parse(parser, {name: spec[2] for name, spec in COMMANDS.items()}, argv)
    args = Arguments(command, groups)
    with user_errors(debug, HINTS):
        state = process_state(getattr(args, "device", "cpu"))
        return RUNS[command].run(args, state)


if __name__ == "__main__":
    main(sys.argv[1:])
