"""What the benchmark modes record beside their tables: the results document with its provenance,
and, with `--model-index CARD`, the headline metrics in a model card's model-index."""

from __future__ import annotations

from pathlib import Path

from nearid import card
from nearid.reports import results_file


def results_document(benchmark, scorer_provenance, metrics_, datasets, skipped, stats, split_file=None, notes=None):
    """The results JSON of a benchmark run: its metrics, the images left out, and the provenance of
    the scorer, the datasets, the split file and the embedding work (`stats`; None for a run that embeds
    nothing); `notes` say what metrics mean."""
    extra = None if stats is None else {"embedding": stats}
    prov = results_file.provenance(scorer_provenance, datasets, split_file, extra=extra)
    return results_file.results_document(benchmark, scorer_provenance, metrics_, prov, skipped, notes=notes)


def record_model_index(args, outputs, benchmark, values, split, model_name, data) -> None:
    """With --model-index CARD, the headline metrics into the card's model-index (a failure is a warning).

    data: the provenance of the datasets measured on; results are filed only under a Hub dataset
    read at a recorded revision (`card.benchmark_results`), never as local data under a Hub id.
    """
    if not args.model_index:
        return
    results = card.benchmark_results(benchmark, values or {}, split, data)
    if not results:
        print(f"No finite {benchmark} headline metric to record; {args.model_index} left as it was.")
        return
    if not results[0].dataset_type:
        warning = (f"--model-index {args.model_index}: not updated. The {benchmark} data was not read from the Hub at "
                   "a recorded revision, and a model-index result names the Hub dataset it was measured on; "
                   "results on local data would show on the Hub as results on the benchmark. Evaluate the Hub "
                   "dataset to record them.")
        outputs.warn(warning)
        return
    name = args.model_index_name or card.card_model_name(args.model_index) or Path(model_name.rstrip("/")).name
    if outputs.optional(f"updating the model card {args.model_index}", card.update_model_card, args.model_index,
                        name, results):
        print(f"Recorded {', '.join(r.metric_name for r in results)} in the model-index of {args.model_index} "
              f"(model {name!r}).")
