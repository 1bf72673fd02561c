"""DreamBench++'s metric-to-human correlation (`evaluate.py dreambench`), from published score files
or by scoring a samples folder, with its table, the per-image scores and results JSON."""

from __future__ import annotations

from pathlib import Path

from nearid import metrics
from nearid.cli import lazy_module
from nearid.data import dreambench_files
from nearid.evaluation import protocol
from nearid.evaluation.records import record_model_index, results_document
from nearid.io import atomic_write_json, atomic_write_text
from nearid.options import embed, open_outputs
from nearid.reports import tables

# Loaded when images are scored: reading published score files needs no image decode (transformers).
image_index = lazy_module("nearid.store.image_index")


def dreambench_from_images(args, state) -> tuple:
    """({method: {key: 100 x cosine}}, scorer provenance with the embedding stats, skipped list)."""
    methods = args.methods or dreambench_files.dreambench_methods(args.samples)
    index = image_index.ImageIndex(args.skip_bad_images)
    pairs = protocol.dreambench_pairs_index(args.samples, methods, index)
    scorer, embedded = embed(index, args, state)
    return (protocol.dreambench_scores(pairs, embedded.vectors),
            {**scorer.provenance(), "embedding": embedded.stats}, embedded.skipped)


def run(args, state):
    """MH of the scores of `args` (read, or computed from images) against the human ratings (None on the
    other processes of a launch)."""
    if args.scores_from:
        methods = args.methods or list(metrics.DREAMBENCH_METHODS)
        scores = dreambench_files.load_dreambench_scores(args.ratings, args.scores_from, methods)
        scorer, skipped = {"spec": f"score files {args.scores_from}"}, []
    else:
        scores, scorer, skipped = dreambench_from_images(args, state)
        methods = list(scores)
    if not state.is_main_process:
        return None
    human = dreambench_files.load_dreambench_human(args.ratings, methods)
    result = metrics.dreambench_mh(scores, human, methods, scorer=scorer["spec"])
    write_outputs(args, scorer, scores, result, skipped)
    return result


def write_outputs(args, scorer, scores, result, skipped):
    outputs = open_outputs(args, "evaluate.py")
    if not args.scores_from:
        for method, method_scores in scores.items():  # the published per-image score format
            atomic_write_json(outputs.path(f"dreambench_scores/{method}.json"), method_scores)
    table = tables.table1_markdown({scorer["spec"]: tables.table1_row(dreambench=result)})
    table += tables.dreambench_note(result)
    atomic_write_text(outputs.path("dreambench_table.md"), table)
    ratings = {"kind": "local", "path": str(Path(args.ratings).resolve())}  # the authors' rating files
    record_model_index(args, outputs, "dreambench", result, None, scorer["spec"], ratings)
    outputs.finish(results_document("dreambench", scorer, result, [ratings], skipped, None,
                                    notes=tables.DREAMBENCH_NOTES))
    print(table)
    print(f"MH per category: {tables.mh_per_category(result)}")
