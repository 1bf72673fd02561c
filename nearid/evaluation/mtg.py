"""The MTG part-level benchmark (`evaluate.py mtg`): oracles from the masks, 5 similarities per row,
MO, MOpair, SSR and PA, with its table, per-sample CSV, plot and results JSON."""

from __future__ import annotations

from nearid import metrics
from nearid.cli import DatasetSource
from nearid.data import readers
from nearid.evaluation import protocol
from nearid.evaluation.records import record_model_index, results_document
from nearid.io import atomic_write_text, write_csv
from nearid.options import embed, open_outputs
from nearid.reports import plots, tables
from nearid.store.image_index import ImageIndex


def run(args, state):
    """MTG's scores of the scorer of `args` on the split of `args`, with the embedding work (None on the
    other processes of a launch)."""
    dataset, dataset_provenance = readers.open_mtg(DatasetSource.parse(args.mtg), args.split)
    index = ImageIndex(args.skip_bad_images)
    keys, row_skipped = protocol.mtg_keys(dataset, index)
    oracles, oracle_skipped = protocol.mtg_oracles(dataset, args.skip_bad_images)
    scorer, embedded = embed(index, args, state)
    if not state.is_main_process:
        return None
    skipped = embedded.skipped + row_skipped + oracle_skipped
    sims = protocol.mtg_similarities(embedded.vectors, keys, embedded.vectors.dim)
    scored = protocol.mtg_scored_rows(sims, oracles)
    if scored.sum() < 2:
        raise ValueError(f"only {int(scored.sum())} of {len(dataset)} MTG rows could be scored; the correlations "
                         f"need at least 2. Left out: {skipped[:3]}")
    scores = metrics.mtg_scores(*(sims[name][scored] for name, _, _ in protocol.MTG_SIMILARITIES),
                                oracles[scored, 0], oracles[scored, 1])
    scores.update(n_rows_dataset=len(dataset), n_rows_unscored=int((~scored).sum()))
    write_outputs(args, scorer, scores, sims, oracles, scored, skipped, dataset_provenance, embedded.stats)
    return {**scores, "embedding": embedded.stats}


def write_outputs(args, scorer, scores, sims, oracles, scored, skipped, dataset_provenance, stats):
    outputs = open_outputs(args, "evaluate.py")
    table = tables.mtg_markdown(scorer.spec, scores, protocol.MTG_CORRELATIONS)
    write_csv(outputs.path("mtg_per_sample.csv"), protocol.mtg_rows(sims, oracles))
    atomic_write_text(outputs.path("mtg_table.md"), table)
    outputs.optional("plotting mtg_similarity_vs_oracle.png", plots.plot_mtg_similarity_vs_oracle,
                     outputs.path("mtg_similarity_vs_oracle.png"), {k: v[scored] for k, v in sims.items()},
                     oracles[scored], scores, scorer.spec, protocol.MTG_SIMILARITIES, protocol.MTG_CORRELATIONS)
    record_model_index(args, outputs, "mtg", scores, args.split, scorer.spec, dataset_provenance)
    outputs.finish(results_document("mtg", scorer.provenance(), scores, [dataset_provenance], skipped, stats))
    print(table)
