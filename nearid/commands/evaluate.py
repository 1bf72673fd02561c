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

from nearid import metrics
from nearid.cli import (
    REQUIRED,
    NearIDSources,
    apply_published_splits,
    build_parser,
    lazy_module,
    option,
    parse,
    user_errors,
)
from nearid.options import HINTS, Arguments, EmbeddingArguments, ScorerArguments, process_state

# torch, transformers and datasets come with the library: loaded when a run first uses it, not for --help.
scorers = lazy_module("nearid.scorers")

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


# --- running a mode ------------------------------------------------------------------------------

# The library module that runs each mode (`nearid.evaluation.<module>.run`).
RUNS = {mode: lazy_module(f"nearid.evaluation.{module}") for mode, module in (
    ("nearid", "nearid_benchmark"), ("retrieval", "retrieval"), ("mtg", "mtg"), ("dreambench", "dreambench"),
    ("score", "score"), ("table1", "table1"))}


def table1_modes(args: Arguments) -> dict:
    """The arguments of the modes a table1 run runs, each into its own folder under --output-dir."""
    common = {ScorerArguments: args.groups[ScorerArguments], EmbeddingArguments: args.groups[EmbeddingArguments],
              ModelIndexArguments: ModelIndexArguments()}
    out = Path(args.output_dir)

    def mode(name, group):
        return Arguments(name, {type(group): group, **common, OutputArguments: OutputArguments(str(out / name))})

    modes = {"nearid": mode("nearid", NearIDArguments(positives=args.positives, source=args.source,
                                                      split_file=args.split_file)),
             "mtg": mode("mtg", MTGArguments(mtg=args.mtg, split=args.mtg_split))}
    if args.ratings and args.samples:
        modes["dreambench"] = mode("dreambench", DreamBenchArguments(ratings=args.ratings, samples=args.samples))
    return modes


def run(args: Arguments, state):
    """The mode's run in the library; table1 gets the arguments of the modes it runs."""
    if args.mode == "table1":
        return RUNS["table1"].run(args, state, table1_modes(args))
    return RUNS[args.mode].run(args, state)


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
        return run(args, state)


if __name__ == "__main__":
    main(sys.argv[1:])
