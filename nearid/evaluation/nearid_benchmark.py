"""The NearID benchmark (`evaluate.py nearid`): SSR and PA per distractor source and pooled, with
its table, per-sample CSV, plots and results JSON."""

from __future__ import annotations

from pathlib import Path

from nearid import metrics
from nearid.cli import DatasetSource, named_sources
from nearid.data import nearid_benchmark, split_files
from nearid.evaluation import protocol
from nearid.evaluation.records import record_model_index, results_document
from nearid.io import atomic_write_text, write_csv
from nearid.options import embed, open_outputs
from nearid.reports import plots, tables
from nearid.store.image_index import ImageIndex


def embed_benchmark(bench, args, state) -> tuple:
    """(view keys, distractor keys by source, scorer, embeddings) of every image of a joined NearID benchmark."""
    index = ImageIndex(args.skip_bad_images)
    view_keys, source_keys = protocol.nearid_keys(bench, index)
    scorer, embedded = embed(index, args, state)
    return view_keys, source_keys, scorer, embedded


def run(args, state):
    """SSR and PA of the scorer of `args` on the benchmark rows of `args`: the summary, with the embedding
    work (None on the other processes of a launch)."""
    bench, dataset_provenance = nearid_benchmark.open_benchmark(DatasetSource.parse(args.positives),
                                                                named_sources(args.source))
    if args.split_file:
        bench = bench.select(split_files.load_split_indices(args.split_file, len(bench)))
    view_keys, source_keys, scorer, embedded = embed_benchmark(bench, args, state)
    if not state.is_main_process:
        return None
    margins = protocol.nearid_margins_by_source(embedded.vectors, view_keys, source_keys, embedded.vectors.dim)
    summary = protocol.nearid_summary(margins)
    write_outputs(args, scorer, bench, margins, summary, embedded, dataset_provenance)
    return {**summary, "embedding": embedded.stats}


def nearid_tables(spec: str, summary: dict) -> str:
    """Per-source table, then Table 1's row only when the 7 Table-1 settings were all given."""
    table = tables.per_source_markdown(summary["per_source"])
    if "table1_average" in summary:
        return table + "\n" + tables.table1_markdown({spec: tables.table1_row(nearid=summary["table1_average"])})
    pooled = summary.get("pooled_given")
    note = (f"Pooled over the given sources ({pooled['n_samples']} samples): SSR {pooled['ssr']:.2f}, PA "
            f"{pooled['pa']:.2f}. This is not Table 1's NearID column, which pools the 7 settings "
            f"{', '.join(metrics.NEARID_TABLE1_SOURCES)}.\n") if pooled else ""
    return table + "\n" + note


def write_outputs(args, scorer, bench, margins, summary, embedded, dataset_provenance):
    outputs = open_outputs(args, "evaluate.py")
    table = nearid_tables(scorer.spec, summary)
    ids = bench.ids()
    write_csv(outputs.path("nearid_per_sample.csv"), protocol.nearid_rows(ids, margins))
    atomic_write_text(outputs.path("nearid_table.md"), table)
    outputs.optional("plotting nearid_margins.png", plots.plot_margin_histograms,
                     outputs.path("nearid_margins.png"), {n: m[v] for n, (m, v) in margins.items()}, scorer.spec)
    outputs.optional("plotting nearid_ssr_pa.png", plots.plot_ssr_pa, outputs.path("nearid_ssr_pa.png"),
                     summary["per_source"], scorer.spec)
    split = Path(args.split_file).stem if args.split_file else "train"
    headline = protocol.nearid_headline(summary)
    record_model_index(args, outputs, "nearid", headline, split, scorer.spec, list(dataset_provenance.values()))
    outputs.finish(results_document("nearid", scorer.provenance(), summary, list(dataset_provenance.values()),
                                    embedded.skipped, embedded.stats, args.split_file))
    print(table)
