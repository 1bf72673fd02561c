"""Near-identity retrieval (`evaluate.py retrieval`, docs/method.md section 6): Recall@k, mAP, the
distractor-first rate and clustering ARI/NMI, with its table, per-query CSV, plot and results JSON."""

from __future__ import annotations

from pathlib import Path

from nearid.cli import DatasetSource, named_sources
from nearid.data import nearid_benchmark, split_files
from nearid.evaluation import protocol
from nearid.evaluation.nearid_benchmark import embed_benchmark
from nearid.evaluation.records import record_model_index, results_document
from nearid.io import atomic_write_text, write_csv
from nearid.options import open_outputs
from nearid.reports import plots, tables


def run(args, state):
    """Retrieval on the test rows of `args`, its clustering threshold chosen on the val rows: the scores,
    with the embedding work (None on the other processes of a launch)."""
    bench, dataset_provenance = nearid_benchmark.open_benchmark(DatasetSource.parse(args.positives),
                                                                named_sources(args.source))
    test_rows = (split_files.load_split_indices(args.split_file, len(bench)) if args.split_file
                 else list(range(len(bench))))
    val_rows = split_files.load_split_indices(args.val_split_file, len(bench)) if args.val_split_file else []
    split_files.check_disjoint({"--split-file": test_rows, "--val-split-file": val_rows})
    # One selection for both splits: the image index names every dataset once.
    bench = bench.select(test_rows + val_rows)
    view_keys, source_keys, scorer, embedded = embed_benchmark(bench, args, state)
    if not state.is_main_process:
        return None
    scores, rows = protocol.retrieval_benchmark(bench, view_keys, source_keys, embedded.vectors, test_rows, val_rows)
    write_outputs(args, scorer, scores, rows, embedded, dataset_provenance)
    return {**scores, "embedding": embedded.stats}


def write_outputs(args, scorer, scores, rows, embedded, dataset_provenance):
    outputs = open_outputs(args, "evaluate.py")
    table = tables.retrieval_markdown({scorer.spec: scores}) + (
        f"\n{scores['n_queries']} queries; gallery of {scores['n_gallery']} images ({scores['n_views']} views, "
        f"{scores['n_distractors']} distractors of {', '.join(named_sources(args.source))}); clustering threshold "
        f"{scores['cluster_threshold']:.4f}, chosen on the {scores['cluster_threshold_split']}.\n")
    write_csv(outputs.path("retrieval_per_query.csv"), rows)
    atomic_write_text(outputs.path("retrieval_table.md"), table)
    outputs.optional("plotting retrieval_scores.png", plots.plot_retrieval, outputs.path("retrieval_scores.png"),
                     scores, scorer.spec)
    split = Path(args.split_file).stem if args.split_file else "train"
    record_model_index(args, outputs, "retrieval", scores, split, scorer.spec, list(dataset_provenance.values()))
    outputs.finish(results_document("retrieval", scorer.provenance(), scores, list(dataset_provenance.values()),
                                    embedded.skipped, embedded.stats, args.split_file))
    print(table)
