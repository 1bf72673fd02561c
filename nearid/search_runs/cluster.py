"""`search.py cluster`: the gallery of a search index grouped by identity (average linkage on cosine distance),
and its near-duplicates, with the CSV, a contact sheet per large cluster and the results JSON."""

from __future__ import annotations

from nearid import search as gallery
from nearid import search_reports as shown
from nearid.clustering import IdentityLinkage
from nearid.io import write_csv
from nearid.options import open_outputs
from nearid.reports import plots


def run(args, state):
    """The clustering's summary and one record per gallery image (None on the other processes of a launch)."""
    if not state.is_main_process:
        return None
    index = gallery.SearchIndex.load(args.index_dir)
    linkage = IdentityLinkage(index.finite_vectors(), args.threshold)  # cut again at the higher duplicate threshold
    clusters, duplicates = linkage.labels(args.threshold), linkage.labels(args.duplicate_threshold)
    records = shown.cluster_records(index, clusters, duplicates)
    summary = shown.cluster_summary(clusters, duplicates, args.threshold, args.duplicate_threshold)
    write_outputs(args, index, records, clusters, duplicates, summary)
    return {"summary": summary, "records": records}


def write_outputs(args, index, records, clusters, duplicates, summary):
    outputs = open_outputs(args, "search.py")
    write_csv(outputs.path("clusters.csv"), records)
    for group, rows in shown.large_clusters(clusters, args.sheet_min_size)[:args.max_sheets]:
        name = f"cluster_sheets/cluster_{group:04d}.png"
        outputs.optional(f"drawing {name}", plots.plot_image_grid, outputs.path(name),
                         shown.cluster_sheet(index, rows),
                         f"Cluster {group}: {len(rows)} images at similarity >= {args.threshold}\n"
                         f"{index.scorer.get('spec')}")
    document = shown.results_document("search-cluster", index, args.index_dir, summary, [])
    entries = index.entries()
    outputs.finish({**document, "clusters": shown.label_groups(clusters, entries),
                    "near_duplicates": shown.label_groups(duplicates, entries)})
    print(f"{summary['n_images']} images in {summary['n_clusters']} clusters at similarity >= {args.threshold} "
          f"(largest {summary['largest_cluster']}, {summary['n_singletons']} single images); "
          f"{summary['n_near_duplicate_groups']} near-duplicate groups at >= {args.duplicate_threshold} hold "
          f"{summary['n_images_in_near_duplicate_groups']} images. Results in {outputs.folder}")
