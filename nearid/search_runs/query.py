"""`search.py query`: the top-k gallery images of query images, embedded by the index's own scorer, with the CSV,
the contact sheet and the results JSON."""

from __future__ import annotations

from pathlib import Path

from nearid import scorers
from nearid import search as gallery
from nearid import search_reports as shown
from nearid.io import write_csv
from nearid.options import embedder, open_outputs
from nearid.reports import plots


def run(args, state):
    """The search result and its records, one per hit (None on the other processes of a launch)."""
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
    write_outputs(args, index, result, records, query_embedder.scorer if args.heatmap else None)
    return {"result": result, "records": records}


def write_outputs(args, index, result, records, heatmap_scorer=None):
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
    document = shown.results_document("search-query", index, args.index_dir, summary, result.skipped)
    outputs.finish({**document, "results": [{key: r[key] for key in ("query_group", "queries", "rank", "score",
                                                                       "image", "hash")} for r in records]})
    print(shown.query_summary(index, result, records))
    print(f"Results in {outputs.folder}")
