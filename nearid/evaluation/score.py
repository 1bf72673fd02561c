"""Scoring your own generated images against their references (`evaluate.py score`): per image and
per method and subject, with the CSV, JSON, summary, plot, heatmap contact sheets and results JSON."""

from __future__ import annotations

from pathlib import Path

from nearid import heatmaps, images, scoring
from nearid.data import score_inputs
from nearid.evaluation.records import results_document
from nearid.io import atomic_write_json, atomic_write_text, write_csv
from nearid.options import embed, open_outputs
from nearid.reports import plots
from nearid.store.image_index import ImageIndex


def run(args, state):
    """The scores of the generated images of `args`, their summary and what was left out (None on the other
    processes of a launch)."""
    unused = []
    if args.references:
        items, ignored, unused = score_inputs.score_items_from_subject_folders(args.references, args.generations,
                                                                       args.methods or None)
        source = args.generations
    elif args.samples:
        items, ignored = score_inputs.score_items_from_layout(args.samples, args.methods or None)
        source = args.samples
    else:
        items, ignored, source = score_inputs.read_score_metadata(args.metadata, args.images), [], args.metadata
    index = ImageIndex(args.skip_bad_images)
    generated, references = scoring.index_items(items, index)
    scorer, embedded = embed(index, args, state)
    if not state.is_main_process:
        return None
    records, unscored = scoring.score_records(items, generated, references, embedded.vectors)
    if not records:
        raise images.ImageLoadError(f"none of the {len(items)} generated images could be scored: {unscored[:3]}")
    summary = scoring.summarize_scores(records, unscored)
    skipped = scoring.left_out(embedded.skipped, unscored, ignored)
    write_outputs(args, scorer, records, summary, skipped, source, embedded.stats, items, unused)
    return {"summary": summary, "records": records, "skipped": skipped, "embedding": embedded.stats,
            "unused_references": [{"references": folder, "method": method} for folder, method in unused]}


def write_outputs(args, scorer, records, summary, skipped, source, stats, items, unused=()):
    outputs = open_outputs(args, "evaluate.py")
    markdown = scoring.summary_markdown(summary, skipped, unused)
    write_csv(outputs.path("score_per_image.csv"), [{k: v for k, v in r.items() if k != "references"}
                                                     for r in records])
    atomic_write_json(outputs.path("score_per_image.json"), records)
    atomic_write_text(outputs.path("score_summary.md"), markdown)
    outputs.optional("plotting score_distributions.png", plots.plot_score_distributions,
                     outputs.path("score_distributions.png"), records, scorer.spec)
    if args.heatmaps:
        outputs.optional("drawing the heatmap contact sheets", write_heatmap_sheets, outputs, scorer, records, items,
                         args.heatmaps)
    document = results_document("score", scorer.provenance(), summary,
                                [{"kind": "local", "path": str(Path(source).resolve())}], skipped, stats)
    outputs.finish({**document, "unused_references": [{"references": folder, "method": method}
                                                      for folder, method in unused]})
    print(markdown)


def write_heatmap_sheets(outputs, scorer, records, items, count: int) -> None:
    paths = {(item.method, item.subject, item.generated): item for item in items}
    for (method, subject), lowest in heatmaps.lowest_scoring(records, count).items():
        name = f"heatmaps/{method}__{subject}.png".replace(" ", "_")
        heatmaps.score_sheet(outputs.path(name), scorer,
                             [(record, paths[method, subject, record["generated"]]) for record in lowest])
