"""Evaluate identity scorers on the NearID, MTG and DreamBench++ benchmarks of the paper, or score
your own generated images against their references.

    python evaluate.py nearid --model SCORER --positives SRC --source flux=SRC [--source ...] [--split-file F]
    python evaluate.py retrieval --model SCORER --positives SRC --source flux=SRC [...] [--split-file TEST]
        [--val-split-file VAL]
    python evaluate.py mtg --model SCORER [--mtg SRC] [--split test]
    python evaluate.py dreambench --ratings DIR (--scores-from FOLDER | --model SCORER --samples DIR)
    python evaluate.py score --model SCORER (--references DIR --generations DIR | --samples DIR | --metadata FILE)
    python evaluate.py table1 --model SCORER [--split-file F] [--ratings DIR --samples DIR]

SCORER is a scorer: a NearID model (Hub id or folder) or a baseline as KIND:MODEL (clip, dinov2,
dinov3, siglip, siglip-mean). SRC is a Hub dataset id (pin one with SRC@REVISION), a
`save_to_disk` folder or parquet. With --positives Aleksandar/NearID, the NearID modes evaluate the
paper's published test split (and retrieval picks its threshold on the published val split) unless
split files are given. Every unique image is decoded and embedded once and kept in the
embed-once store (--cache-dir), so a second run of the same scorer embeds nothing. Runs under
`torchrun` / `accelerate launch` split the images between processes, with the same results.
Outputs (under --output-dir): a results JSON with provenance (written last: without it the run did
not finish), a markdown table, a per-sample CSV, PNG plots, and the resolved arguments.
Run `python evaluate.py MODE --help` for each mode's options.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from nearid import card, metrics, reports, scoring
from nearid.cli import (
    REQUIRED,
    DatasetSource,
    NearIDSources,
    apply_published_splits,
    build_parser,
    lazy_module,
    named_sources,
    option,
    parse,
    save_arguments,
    user_errors,
)
from nearid.io import atomic_write_json, atomic_write_text, write_csv
from nearid.options import (
    HINTS,
    Arguments,
    EmbeddingArguments,
    ScorerArguments,
    fill_options,
    load_scorer,
    process_state,
)

# torch, transformers and datasets come with these: loaded when a run first uses them, not for --help.
data, evaluation, heatmaps, images, scorers = (lazy_module(f"nearid.{name}") for name in
                                               ("data", "evaluation", "heatmaps", "images", "scorers"))
image_index = lazy_module("nearid.store.image_index")

# --- arguments -------------------------------------------------------------------------------------


@dataclass
class OptionalScorerArguments(ScorerArguments):
    """The scorer (not needed with --scores-from)"""

    model: str | None = option(None, "scorer, as for the other modes; needed with --samples")


@dataclass
class OutputArguments:
    """Outputs"""

    output_dir: str = option("eval_outputs", "folder for the results; files of an earlier run of the same mode "
                                             "are replaced", folder=True)


@dataclass
class ModelIndexArguments:
    """Model card"""

    model_index: str | None = option(None, "model card (README.md) whose model-index receives the headline metrics "
                                           "after the run; the rest of the card is kept byte for byte. Only data "
                                           "read from the Hub at a recorded revision is filed (local data: a "
                                           "warning, the card is left as it was)",
                                     metavar="README")
    model_index_name: str | None = option(None, "model name in the model-index (default: the card's current one, "
                                                "else the name of --model)")


@dataclass
class NearIDArguments(NearIDSources):
    """The NearID benchmark"""

    split_file: str | None = option(None, "JSON list of row indices to evaluate (e.g. a test split); default: the "
                                          "published test split for Aleksandar/NearID, all rows for other positives")


@dataclass
class RetrievalArguments(NearIDSources):
    """The near-identity retrieval benchmark"""

    split_file: str | None = option(None, "JSON list of the row indices to evaluate (the test split); default: the "
                                          "published test split for Aleksandar/NearID, all rows for other positives")
    val_split_file: str | None = option(None, "JSON list of the val row indices, on which the clustering threshold "
                                              "is chosen; default: the published val split for Aleksandar/NearID, "
                                              "else the evaluated rows (an optimistic threshold, recorded as such)")


@dataclass
class MTGArguments:
    """The MTG benchmark"""

    mtg: str = option("abdo-eldesokey/mtg-dataset", "MTG dataset: Hub id (SRC@REVISION pins one), save_to_disk "
                                                    "folder (Dataset or DatasetDict) or parquet")
    split: str = option("test", "split of a Hub dataset or DatasetDict folder")


@dataclass
class DreamBenchArguments:
    """DreamBench++"""

    ratings: str = option(REQUIRED, "ratings folder (data_human_rating/merged_data/group{1,2}/<method>-cp.json, "
                                    "and published score folders)")
    scores_from: str | None = option(None, "published score folder under --ratings to read instead of embedding, "
                                           "e.g. data_nearid_rating")
    samples: str | None = option(None, "samples folder to score: <method>/{src_image,tgt_image}/...")
    methods: list[str] = option([], "methods to use (default: all found)")


@dataclass
class ScoreArguments:
    """Your generated images and their references (one input kind)"""

    samples: str | None = option(None, "mirrored layout: DIR/{src_image,tgt_image}/<rel> or "
                                       "DIR/<method>/{src_image,tgt_image}/<rel>")
    metadata: str | None = option(None, "CSV, JSON or JSONL file with columns generated, reference[, subject, "
                                        "method]")
    images: str | None = option(None, "with --metadata: the folder its paths are relative to (default: its folder)")
    references: str | None = option(None, "DreamBooth layout: references/<subject>/<image>, several per subject "
                                          "(with --generations)")
    generations: str | None = option(None, "DreamBooth layout: generations/<method>/<subject>/<image>, or "
                                           "generations/<subject>/<image> for one method (with --references)")
    methods: list[str] = option([], "with --samples or --generations: method folders to score (default: all)")
    heatmaps: int = option(0, "heatmap contact sheets (attention and correspondence maps) of the N lowest-scoring "
                              "generations of each method and subject, in heatmaps/; NearID models only. Runs the "
                              "backbone again on those images and their references (0: none, no extra cost)",
                           min=0)


SCORE_DESCRIPTION = """Score your own generated images against reference images.

Inputs, one of:
  --references DIR --generations DIR
                    the DreamBooth layout: references/<subject>/<image> (several references per
                    subject) and generations/<method>/<subject>/<image> (or <subject>/<image> for one
                    method). Every generated image is scored against all references of its subject.
  --samples DIR     mirrored layout, as DreamBench++: DIR/src_image/<rel> is the reference of the
                    generated image DIR/tgt_image/<rel>; or several methods, DIR/<method>/{src_image,
                    tgt_image}/<rel>. The subject of an image is the first folder of <rel>.
  --metadata FILE   a CSV (header line), JSONL (one object per line) or JSON (list of objects) file
                    with columns generated, reference and optionally subject, method. A generated
                    image may have several references: one CSV line per reference, or a JSON list.
                    Paths are relative to --images (default: the metadata file's folder).

Per image: cosine similarity to each reference, their mean and max. Per method and subject: count,
skipped count, mean, median, std, min, max. Outputs: score_per_image.csv, score_per_image.json,
score_summary.md, score_distributions.png, score_results.json (written last); with --heatmaps N,
heatmaps/<method>__<subject>.png: the N lowest-scoring generations with where the head looks and
which patches carry the references' identity (docs/method.md, "Seeing identity").
"""
@dataclass
class Table1Arguments:
    """The benchmarks of Table 1 (defaults: the published datasets on the Hub)"""

    positives: str = option("Aleksandar/NearID", "NearID positives (Hub id, folder or parquet; SRC@REVISION pins one)")
    source: list[str] = option([f"{name}={hub_id}" for name, hub_id in metrics.NEARID_TABLE1_HUB_SOURCES.items()],
                               "distractor sources NAME=SRC[@REVISION]; Table 1 pools these 7 settings",
                               metavar="NAME=SRC")
    split_file: str | None = option(None, "JSON list of the NearID rows to evaluate; default: the authors' published "
                                          "test split (the paper's NearID columns) for Aleksandar/NearID, all rows "
                                          "for other positives")
    mtg: str = option("abdo-eldesokey/mtg-dataset", "MTG dataset (its --mtg-split is evaluated)")
    mtg_split: str = option("test", "MTG split")
    ratings: str | None = option(None, "DreamBench++ ratings folder; without it (and --samples) the DB++ column "
                                       "stays empty")
    samples: str | None = option(None, "DreamBench++ samples folder: <method>/{src_image,tgt_image}/...")


COMMON = (ScorerArguments, EmbeddingArguments, OutputArguments)
MODES = {
    "nearid": ("NearID benchmark: SSR and PA per distractor source",
               "NearID benchmark: SSR and PA per distractor source, and pooled. Writes nearid_results.json (last), "
               "nearid_table.md, nearid_per_sample.csv, nearid_margins.png, nearid_ssr_pa.png.",
               (NearIDArguments, *COMMON, ModelIndexArguments)),
    "retrieval": ("near-identity retrieval: Recall@k, mAP, distractor-first rate, clustering ARI/NMI",
                  "Near-identity retrieval (docs/method.md section 6): every present view queries a gallery of all "
                  "views and distractors; Recall@1/5/10, mAP, the distractor-first rate, and clustering ARI/NMI at "
                  "the threshold chosen on the val split. Writes retrieval_results.json (last), retrieval_table.md, "
                  "retrieval_per_query.csv, retrieval_scores.png.",
                  (RetrievalArguments, *COMMON, ModelIndexArguments)),
    "mtg": ("MTG part-level benchmark: MO, MOpair, SSR and PA",
            "MTG part-level benchmark: oracles from the masks, 5 similarities per row, MO, MOpair, SSR, PA. Writes "
            "mtg_results.json (last), mtg_table.md, mtg_per_sample.csv, mtg_similarity_vs_oracle.png.",
            (MTGArguments, *COMMON, ModelIndexArguments)),
    "dreambench": ("DreamBench++ metric-to-human correlation (MH)",
                   "DreamBench++ MH from published score files or by scoring a samples folder. Writes "
                   "dreambench_results.json (last), dreambench_table.md and, from images, "
                   "dreambench_scores/<method>.json.",
                   (DreamBenchArguments, OptionalScorerArguments, EmbeddingArguments, OutputArguments,
                    ModelIndexArguments)),
    "score": ("score your own generated images against references",
              SCORE_DESCRIPTION,
              (ScoreArguments, *COMMON)),
    "table1": ("every Table-1 benchmark for one model, its row beside the paper's",
               "Runs the nearid, mtg and dreambench modes for --model (each into its own folder under "
               "--output-dir) and prints the model's Table-1 row beside the paper's. Writes table1.md and "
               "table1_results.json (last).",
               (Table1Arguments, *COMMON)),
}


def parse_arguments(argv=None) -> tuple:
    parser = build_parser("evaluate.py", __doc__, commands=MODES)
    mode, groups, debug = parse(parser, {name: spec[2] for name, spec in MODES.items()}, argv)
    return Arguments(mode, groups), debug


def check_arguments(args: Arguments) -> None:
    """Combinations a parser cannot express, explained."""
    if args.mode == "dreambench" and not args.scores_from and not (args.model and args.samples):
        raise ValueError("dreambench needs either --scores-from FOLDER, or --model SCORER and --samples DIR")
    if args.mode == "score":
        check_score_inputs(args)
    if not args.cache_dir:
        raise ValueError("--cache-dir needs a folder: every image is embedded once into it (it may be a temporary "
                         "folder)")
    if getattr(args, "model_index", None) and not Path(args.model_index).is_file():
        raise FileNotFoundError(f"--model-index {args.model_index}: no such file; give the model card (README.md) "
                                "to record the results in")


def check_score_inputs(args: Arguments) -> None:
    folders = (args.references, args.generations)
    inputs = [bool(args.samples), bool(args.metadata), any(folders)]
    if sum(inputs) != 1:
        raise ValueError("score needs exactly one input: --references DIR --generations DIR (the DreamBooth "
                         "layout), --samples DIR (a mirrored layout) or --metadata FILE")
    if any(folders) and not all(folders):
        raise ValueError("score: --references and --generations go together (references/<subject>/<image>, "
                         "generations/<method>/<subject>/<image>)")
    if args.images and not args.metadata:
        raise ValueError("score: --images goes with --metadata (the folder its paths are relative to)")
    if args.heatmaps and scorers.parse_spec(args.model)[0] != "nearid":
        raise ValueError(f"score: --heatmaps draws the NearID head's maps, but --model {args.model} is a "
                         f"'{scorers.parse_spec(args.model)[0]}' baseline; drop --heatmaps or give a NearID model")
    if args.methods and args.metadata:
        raise ValueError("score: --methods picks method folders of --samples or --generations; with --metadata, "
                         "use its method column")


# --- shared steps ----------------------------------------------------------------------------------


def embed(index, args, state) -> tuple:
    """(scorer, its embeddings of every image of `index`): the step every mode shares."""
    scorer = load_scorer(args, state)
    return scorer, evaluation.embed_images(scorer, index, args.cache_dir, fill_options(args, scorer), state)


def results_document(benchmark, scorer_provenance, metrics_, datasets, skipped, stats, split_file=None):
    prov = reports.provenance(scorer_provenance, datasets, split_file, extra={"embedding": stats})
    return reports.results_document(benchmark, scorer_provenance, metrics_, prov, skipped)


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
        outputs.warnings.append(warning)
        print(f"warning: {warning}", file=sys.stderr)
        return
    name = args.model_index_name or card.card_model_name(args.model_index) or Path(model_name.rstrip("/")).name
    if outputs.optional(f"updating the model card {args.model_index}", card.update_model_card, args.model_index,
                        name, results):
        print(f"Recorded {', '.join(r.metric_name for r in results)} in the model-index of {args.model_index} "
              f"(model {name!r}).")


# --- nearid ----------------------------------------------------------------------------------------


def embed_benchmark(bench, args, state) -> tuple:
    """(view keys, distractor keys by source, scorer, embeddings) of every image of a joined NearID benchmark."""
    index = image_index.ImageIndex(args.skip_bad_images)
    view_keys, source_keys = evaluation.nearid_keys(bench, index)
    scorer, embedded = embed(index, args, state)
    return view_keys, source_keys, scorer, embedded


def run_nearid(args, state):
    bench, dataset_provenance = data.open_benchmark(DatasetSource.parse(args.positives), named_sources(args.source))
    if args.split_file:
        bench = bench.select(data.load_split_indices(args.split_file, len(bench)))
    view_keys, source_keys, scorer, embedded = embed_benchmark(bench, args, state)
    if not state.is_main_process:
        return None
    margins = evaluation.nearid_margins_by_source(embedded.vectors, view_keys, source_keys, embedded.vectors.dim)
    summary = evaluation.nearid_summary(margins)
    write_nearid_outputs(args, scorer, bench, margins, summary, embedded, dataset_provenance)
    return {**summary, "embedding": embedded.stats}


def nearid_tables(spec: str, summary: dict) -> str:
    """Per-source table, then Table 1's row only when the 7 Table-1 settings were all given."""
    table = reports.per_source_markdown(summary["per_source"])
    if "table1_average" in summary:
        return table + "\n" + reports.table1_markdown({spec: reports.table1_row(nearid=summary["table1_average"])})
    pooled = summary.get("pooled_given")
    note = (f"Pooled over the given sources ({pooled['n_samples']} samples): SSR {pooled['ssr']:.2f}, PA "
            f"{pooled['pa']:.2f}. This is not Table 1's NearID column, which pools the 7 settings "
            f"{', '.join(metrics.NEARID_TABLE1_SOURCES)}.\n") if pooled else ""
    return table + "\n" + note


def write_nearid_outputs(args, scorer, bench, margins, summary, embedded, dataset_provenance):
    outputs = reports.RunOutputs(args.output_dir, "nearid_results.json")
    save_arguments(outputs.path("nearid_args.json"), "evaluate.py nearid", *args.groups.values())
    table = nearid_tables(scorer.spec, summary)
    ids = list(bench.positives.select_columns(["id"])["id"])
    write_csv(outputs.path("nearid_per_sample.csv"), evaluation.nearid_rows(ids, margins))
    atomic_write_text(outputs.path("nearid_table.md"), table)
    outputs.optional("plotting nearid_margins.png", reports.plot_margin_histograms,
                     outputs.path("nearid_margins.png"), {n: m[v] for n, (m, v) in margins.items()}, scorer.spec)
    outputs.optional("plotting nearid_ssr_pa.png", reports.plot_ssr_pa, outputs.path("nearid_ssr_pa.png"),
                     summary["per_source"], scorer.spec)
    split = Path(args.split_file).stem if args.split_file else "train"
    headline = evaluation.nearid_headline(summary)
    record_model_index(args, outputs, "nearid", headline, split, scorer.spec, list(dataset_provenance.values()))
    outputs.finish(results_document("nearid", scorer.provenance(), summary, list(dataset_provenance.values()),
                                    embedded.skipped, embedded.stats, args.split_file))
    print(table)


# --- retrieval -------------------------------------------------------------------------------------


def run_retrieval(args, state):
    bench, dataset_provenance = data.open_benchmark(DatasetSource.parse(args.positives), named_sources(args.source))
    test_rows = data.load_split_indices(args.split_file, len(bench)) if args.split_file else list(range(len(bench)))
    val_rows = data.load_split_indices(args.val_split_file, len(bench)) if args.val_split_file else []
    data.check_disjoint({"--split-file": test_rows, "--val-split-file": val_rows})
    # One selection for both splits: the image index names every dataset once.
    bench = bench.select(test_rows + val_rows)
    view_keys, source_keys, scorer, embedded = embed_benchmark(bench, args, state)
    if not state.is_main_process:
        return None
    scores, rows = evaluation.retrieval_benchmark(bench, view_keys, source_keys, embedded.vectors, test_rows, val_rows)
    write_retrieval_outputs(args, scorer, scores, rows, embedded, dataset_provenance)
    return {**scores, "embedding": embedded.stats}


def write_retrieval_outputs(args, scorer, scores, rows, embedded, dataset_provenance):
    outputs = reports.RunOutputs(args.output_dir, "retrieval_results.json")
    save_arguments(outputs.path("retrieval_args.json"), "evaluate.py retrieval", *args.groups.values())
    table = reports.retrieval_markdown({scorer.spec: scores}) + (
        f"\n{scores['n_queries']} queries; gallery of {scores['n_gallery']} images ({scores['n_views']} views, "
        f"{scores['n_distractors']} distractors of {', '.join(named_sources(args.source))}); clustering threshold "
        f"{scores['cluster_threshold']:.4f}, chosen on the {scores['cluster_threshold_split']}.\n")
    write_csv(outputs.path("retrieval_per_query.csv"), rows)
    atomic_write_text(outputs.path("retrieval_table.md"), table)
    outputs.optional("plotting retrieval_scores.png", reports.plot_retrieval, outputs.path("retrieval_scores.png"),
                     scores, scorer.spec)
    split = Path(args.split_file).stem if args.split_file else "train"
    record_model_index(args, outputs, "retrieval", scores, split, scorer.spec, list(dataset_provenance.values()))
    outputs.finish(results_document("retrieval", scorer.provenance(), scores, list(dataset_provenance.values()),
                                    embedded.skipped, embedded.stats, args.split_file))
    print(table)


# --- mtg -------------------------------------------------------------------------------------------


def run_mtg(args, state):
    dataset, dataset_provenance = data.open_mtg(DatasetSource.parse(args.mtg), args.split)
    index = image_index.ImageIndex(args.skip_bad_images)
    keys, row_skipped = evaluation.mtg_keys(dataset, index)
    oracles, oracle_skipped = evaluation.mtg_oracles(dataset, args.skip_bad_images)
    scorer, embedded = embed(index, args, state)
    if not state.is_main_process:
        return None
    skipped = embedded.skipped + row_skipped + oracle_skipped
    sims = evaluation.mtg_similarities(embedded.vectors, keys, embedded.vectors.dim)
    scored = evaluation.mtg_scored_rows(sims, oracles)
    if scored.sum() < 2:
        raise ValueError(f"only {int(scored.sum())} of {len(dataset)} MTG rows could be scored; the correlations "
                         f"need at least 2. Left out: {skipped[:3]}")
    scores = metrics.mtg_scores(*(sims[name][scored] for name, _, _ in evaluation.MTG_SIMILARITIES),
                                oracles[scored, 0], oracles[scored, 1])
    scores.update(n_rows_dataset=len(dataset), n_rows_unscored=int((~scored).sum()))
    write_mtg_outputs(args, scorer, scores, sims, oracles, skipped, dataset_provenance, embedded.stats)
    return {**scores, "embedding": embedded.stats}


def write_mtg_outputs(args, scorer, scores, sims, oracles, skipped, dataset_provenance, stats):
    outputs = reports.RunOutputs(args.output_dir, "mtg_results.json")
    save_arguments(outputs.path("mtg_args.json"), "evaluate.py mtg", *args.groups.values())
    table = reports.mtg_markdown(scorer.spec, scores, evaluation.MTG_CORRELATIONS)
    scored = evaluation.mtg_scored_rows(sims, oracles)
    write_csv(outputs.path("mtg_per_sample.csv"), evaluation.mtg_rows(sims, oracles))
    atomic_write_text(outputs.path("mtg_table.md"), table)
    outputs.optional("plotting mtg_similarity_vs_oracle.png", reports.plot_mtg_similarity_vs_oracle,
                     outputs.path("mtg_similarity_vs_oracle.png"), {k: v[scored] for k, v in sims.items()},
                     oracles[scored], scores, scorer.spec, evaluation.MTG_SIMILARITIES, evaluation.MTG_CORRELATIONS)
    record_model_index(args, outputs, "mtg", scores, args.split, scorer.spec, dataset_provenance)
    outputs.finish(results_document("mtg", scorer.provenance(), scores, [dataset_provenance], skipped, stats))
    print(table)


# --- dreambench ------------------------------------------------------------------------------------


def dreambench_from_images(args, state) -> tuple:
    """({method: {key: 100 x cosine}}, scorer provenance with the embedding stats, skipped list)."""
    methods = args.methods or data.dreambench_methods(args.samples)
    index = image_index.ImageIndex(args.skip_bad_images)
    pairs = evaluation.dreambench_pairs_index(args.samples, methods, index)
    scorer, embedded = embed(index, args, state)
    return (evaluation.dreambench_scores(pairs, embedded.vectors),
            {**scorer.provenance(), "embedding": embedded.stats}, embedded.skipped)


def run_dreambench(args, state):
    if args.scores_from:
        methods = args.methods or list(metrics.DREAMBENCH_METHODS)
        scores = data.load_dreambench_scores(args.ratings, args.scores_from, methods)
        scorer, skipped = {"spec": f"score files {args.scores_from}"}, []
    else:
        scores, scorer, skipped = dreambench_from_images(args, state)
        methods = list(scores)
    if not state.is_main_process:
        return None
    human = data.load_dreambench_human(args.ratings, methods)
    result = metrics.dreambench_mh(scores, human, methods, scorer=scorer["spec"])
    write_dreambench_outputs(args, scorer, scores, result, skipped)
    return result


def write_dreambench_outputs(args, scorer, scores, result, skipped):
    outputs = reports.RunOutputs(args.output_dir, "dreambench_results.json")
    save_arguments(outputs.path("dreambench_args.json"), "evaluate.py dreambench", *args.groups.values())
    if not args.scores_from:
        for method, method_scores in scores.items():  # the published per-image score format
            atomic_write_json(outputs.path(f"dreambench_scores/{method}.json"), method_scores)
    table = reports.table1_markdown({scorer["spec"]: reports.table1_row(dreambench=result)})
    table += reports.dreambench_note(result)
    atomic_write_text(outputs.path("dreambench_table.md"), table)
    ratings = {"kind": "local", "path": str(Path(args.ratings).resolve())}  # the authors' rating files
    record_model_index(args, outputs, "dreambench", result, None, scorer["spec"], ratings)
    prov = reports.provenance(scorer, [ratings])
    outputs.finish(reports.results_document("dreambench", scorer, result, prov, skipped,
                                            notes=reports.DREAMBENCH_NOTES))
    print(table)
    print(f"MH per category: {reports.mh_per_category(result)}")


# --- score -----------------------------------------------------------------------------------------


def run_score(args, state):
    unused = []
    if args.references:
        items, ignored, unused = data.score_items_from_subject_folders(args.references, args.generations,
                                                                       args.methods or None)
        source = args.generations
    elif args.samples:
        items, ignored = data.score_items_from_layout(args.samples, args.methods or None)
        source = args.samples
    else:
        items, ignored, source = data.read_score_metadata(args.metadata, args.images), [], args.metadata
    index = image_index.ImageIndex(args.skip_bad_images)
    generated, references = scoring.index_items(items, index)
    scorer, embedded = embed(index, args, state)
    if not state.is_main_process:
        return None
    records, unscored = scoring.score_records(items, generated, references, embedded.vectors)
    if not records:
        raise images.ImageLoadError(f"none of the {len(items)} generated images could be scored: {unscored[:3]}")
    summary = scoring.summarize_scores(records, unscored)
    skipped = scoring.left_out(embedded.skipped, unscored, ignored)
    write_score_outputs(args, scorer, records, summary, skipped, source, embedded.stats, items, unused)
    return {"summary": summary, "records": records, "skipped": skipped, "embedding": embedded.stats,
            "unused_references": [{"references": folder, "method": method} for folder, method in unused]}


def write_score_outputs(args, scorer, records, summary, skipped, source, stats, items, unused=()):
    outputs = reports.RunOutputs(args.output_dir, "score_results.json")
    save_arguments(outputs.path("score_args.json"), "evaluate.py score", *args.groups.values())
    markdown = scoring.summary_markdown(summary, skipped, unused)
    write_csv(outputs.path("score_per_image.csv"), [{k: v for k, v in r.items() if k != "references"}
                                                     for r in records])
    atomic_write_json(outputs.path("score_per_image.json"), records)
    atomic_write_text(outputs.path("score_summary.md"), markdown)
    outputs.optional("plotting score_distributions.png", reports.plot_score_distributions,
                     outputs.path("score_distributions.png"), records, scorer.spec)
    if args.heatmaps:
        outputs.optional("drawing the heatmap contact sheets", write_heatmap_sheets, outputs, scorer, records, items,
                         args.heatmaps)
    prov = reports.provenance(scorer.provenance(), [{"kind": "local", "path": str(Path(source).resolve())}],
                              extra={"embedding": stats})
    document = reports.results_document("score", scorer.provenance(), summary, prov, skipped)
    outputs.finish({**document, "unused_references": [{"references": folder, "method": method}
                                                      for folder, method in unused]})
    print(markdown)


def write_heatmap_sheets(outputs, scorer, records, items, count: int) -> None:
    paths = {(item.method, item.subject, item.generated): item for item in items}
    for (method, subject), lowest in heatmaps.lowest_scoring(records, count).items():
        name = f"heatmaps/{method}__{subject}.png".replace(" ", "_")
        heatmaps.score_sheet(outputs.path(name), scorer,
                             [(record, paths[method, subject, record["generated"]]) for record in lowest])


# --- table1 ----------------------------------------------------------------------------------------


def run_table1(args, state):
    """The nearid, mtg and dreambench modes for one model, then its Table-1 row beside the paper's."""
    common = {ScorerArguments: args.groups[ScorerArguments], EmbeddingArguments: args.groups[EmbeddingArguments],
              ModelIndexArguments: ModelIndexArguments()}
    out = Path(args.output_dir)

    def mode(name, group):
        groups = {type(group): group, **common, OutputArguments: OutputArguments(str(out / name))}
        return RUNS[name](Arguments(name, groups), state)

    nearid = mode("nearid", NearIDArguments(positives=args.positives, source=args.source,
                                            split_file=args.split_file))
    mtg = mode("mtg", MTGArguments(mtg=args.mtg, split=args.mtg_split))
    dreambench = None
    if args.ratings and args.samples:
        dreambench = mode("dreambench", DreamBenchArguments(ratings=args.ratings, samples=args.samples))
    if not state.is_main_process:
        return None
    headline = evaluation.nearid_headline(nearid)
    row = reports.table1_row(nearid=headline, mtg=mtg, dreambench=dreambench)
    write_table1_outputs(args, row, list(named_sources(args.source)))
    return row


def write_table1_outputs(args, row, sources):
    outputs = reports.RunOutputs(args.output_dir, "table1_results.json")
    save_arguments(outputs.path("table1_args.json"), "evaluate.py table1", *args.groups.values())
    origin = table1_data_origin(args)
    rows = {f"{args.model} (this run, {origin})": row,
            **{name: dict(zip((k for _, k, _ in reports.TABLE1_COLUMNS), values))
               for name, values in reports.PAPER_TABLE1.items()}}
    table = reports.table1_markdown(rows, nearid_sources=sources)
    notes = [f"Data: this run's row is on {origin}; the (paper) rows are the paper's Table 1 on the published "
             "benchmarks." + (" Synthetic data (written by nearid.synthetic) shows that the pipeline runs; its "
                              "numbers say nothing about the published benchmarks." if "synthetic" in origin else ""),
             "NearID columns: " + nearid_rows_note(args.split_file),
             "DB++ column: " + ("the object category of the DreamBench++ samples scored here." if args.samples else
                                "not evaluated (give --ratings and --samples).")]
    text = table + "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    atomic_write_text(outputs.path("table1.md"), text)
    outputs.finish({"benchmark": "table1", "model": args.model, "row": row, "notes": notes,
                    "outputs": {name: str(Path(args.output_dir) / name) for name in ("nearid", "mtg", "dreambench")}})
    print(text)


def nearid_rows_note(split_file) -> str:
    """Which NearID rows a Table-1 row was computed on, and whether that is comparable to the paper."""
    if split_file and Path(split_file).resolve() == data.published_split_file("test").resolve():
        return "the authors' published test split (500 rows), as in the paper."
    if split_file:
        return f"the rows of {split_file}."
    return ("every row of the positives (no --split-file), which is not the paper's test split: these numbers are "
            "not comparable to the paper's.")


def table1_data_origin(args) -> str:
    """"synthetic data", "local data", "Hub data" or a mix ("synthetic data + Hub data"): where the row's data came
    from, so a row on other data is never read as one on the paper's benchmarks."""
    used = [args.positives, *named_sources(args.source).values(), args.mtg] + ([args.samples] if args.samples else [])
    origins = {data.data_origin(DatasetSource.parse(str(source)).location) for source in used}
    return " + ".join(f"{'Hub' if origin == 'hub' else origin} data"
                      for origin in ("synthetic", "local", "hub") if origin in origins)


# --- command line ----------------------------------------------------------------------------------

RUNS = {"nearid": run_nearid, "retrieval": run_retrieval, "mtg": run_mtg, "dreambench": run_dreambench,
        "score": run_score, "table1": run_table1}


def main(argv=None):
    args, debug = parse_arguments(argv)
    with user_errors(debug, HINTS):
        check_arguments(args)
        notes = apply_published_splits(args.groups.values(), getattr(args, "positives", None),
                                       {"split_file": "test", "val_split_file": "val"})
        args = Arguments(args.mode, args.groups)  # the namespace again, with the published splits
        device = args.device if getattr(args, "model", None) else "cpu"
        state = process_state(device)
        if state.is_main_process and notes:
            print("\n".join(notes))
        return RUNS[args.mode](args, state)


if __name__ == "__main__":
    main(sys.argv[1:])
