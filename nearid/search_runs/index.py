"""`search.py index`: embed a gallery into a search index, or bring an index up to date with its gallery."""

from __future__ import annotations

from pathlib import Path

from nearid import search as gallery
from nearid import search_reports as shown
from nearid.ann import IndexSettings
from nearid.cli import DatasetSource, save_arguments
from nearid.data import readers
from nearid.options import embedder
from nearid.reports import results_file


def run(args, state):
    """What the sync did (images added, removed, embedded now or read back, left out), the index folder and the
    recall of an approximate index; on the other processes of a launch, the sync's report alone."""
    images, columns, dataset_provenance = gallery_sources(args)
    index_embedder = embedder(args, state)
    # One run at a time, from loading the index to saving it: a second run waits, then builds on this one's index.
    with gallery.one_writer_of(args.index_dir, state):
        index = open_or_create(args, index_embedder)
        report = index.sync(images, columns)
        if not state.is_main_process:
            return report
        prov = results_file.provenance(index_embedder.scorer.provenance(), dataset_provenance,
                                       extra={"last_update": report})
        folder = index.save(args.index_dir, {"provenance": prov, "ignored": report["ignored"]})
        save_arguments(folder / "index_args.json", "search.py index", *args.groups.values())
    print(shown.index_summary(index, report, folder, args.cache_dir))
    return {**report, "index": str(folder), "recall_at_10": index.recall}


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


def open_or_create(args, index_embedder: gallery.Embedder) -> gallery.SearchIndex:
    """The index of --index-dir, or a new one; one built by another scorer is refused unless --overwrite."""
    settings = IndexSettings(args.index_type, args.nlist, args.nprobe, args.hnsw_m, ef_search=args.ef_search)
    folder = Path(args.index_dir)
    gallery.check_replaceable(folder)  # before anything is embedded
    if not (folder / gallery.INFO_FILE).is_file() or args.overwrite:
        return gallery.SearchIndex.create(index_embedder, settings)
    try:
        index = gallery.SearchIndex.load(folder, index_embedder)
    except gallery.SearchIndexMismatch as error:
        raise gallery.SearchIndexMismatch(f"{error} Or pass --overwrite to replace it.") from None
    index.use(settings)
    return index
