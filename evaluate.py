"""Evaluate identity scorers on the NearID benchmark and DreamBench++ (SPEC §4).

    python evaluate.py nearid --model SPEC --positives SRC --source flux=SRC [--source ...] [--split-file F]
    python evaluate.py dreambench --ratings DIR (--scores-from FOLDER | --model SPEC --samples DIR)

SPEC is a scorer (see nearid_scorers: `Aleksandar/nearid-siglip2`, `clip:...`, `dinov2:...`,
`siglip:...`, `siglip-mean:...`); SRC a Hub dataset id, a `save_to_disk` folder or parquet.
Every unique image is decoded and embedded once per run, and embeddings are cached on disk
(`--cache-dir`), so a second identical run performs no forward pass. Runs under
`accelerate launch` split the images between processes; the results are the same.
Outputs (under --output-dir): results JSON with provenance, a markdown table, a per-sample CSV
and PNG plots, all written atomically by the main process.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import nearid_data as data
import nearid_metrics as metrics
import nearid_reports as reports
from nearid_embedding import EmbeddingCache, embed_missing, embedding_matrix
from nearid_scorers import Scorer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _decode(item):
    """(encoded ref, where) -> RGB PIL image; top-level so DataLoader workers can pickle it."""
    ref, where = item
    return data.decode_image(ref, where).convert("RGB")


class ImageTable:
    """Unique images of a run by content hash, remembering where each was first seen (for errors)."""

    def __init__(self):
        self.items = {}

    def add_column(self, dataset, column, what):
        """Hashes of one image column (None where the image is missing), registering new images."""
        keys = []
        for row, ref in enumerate(data.image_refs(dataset, column, range(len(dataset)))):
            if ref is None:
                keys.append(None)
                continue
            where = f"{what} row {row} column {column}"
            key = data.content_hash(ref, where)
            self.items.setdefault(key, (ref, where))
            keys.append(key)
        return keys

    def add_files(self, paths):
        keys = []
        for path in paths:
            ref = {"bytes": None, "path": str(path)}
            key = data.content_hash(ref, str(path))
            self.items.setdefault(key, (ref, str(path)))
            keys.append(key)
        return keys


def embed_table(scorer, table, args, state):
    """Embed the table's images that the cache lacks; returns (cache, skipped list for the report)."""
    cache = EmbeddingCache(args.cache_dir, scorer.fingerprint)
    skipped = embed_missing(scorer, table.items, cache, _decode, batch_size=args.batch_size,
                            num_workers=args.num_workers, skip_errors=args.skip_bad_images, state=state)
    return cache, [{"image": table.items[k][1], "reason": reason} for k, reason in sorted(skipped.items())]


def embedding_stats(scorer, table):
    """What this run computed: a rerun with a warm cache shows zero forward passes."""
    return {"unique_images": len(table.items), "images_embedded": scorer.images_embedded,
            "forward_passes": scorer.forward_passes}


def stacked(cache, slot_keys, dim):
    """[N, slots, D] embeddings and [N, slots] presence from per-slot key lists."""
    columns = [embedding_matrix(cache, keys, dim) for keys in slot_keys]
    return np.stack([m for m, _ in columns], axis=1), np.stack([p for _, p in columns], axis=1)


# --- nearid ----------------------------------------------------------------------------------------


def run_nearid(args, state):
    bench, dataset_provenance = data.open_benchmark(args.positives, dict(args.source))
    if args.split_file:
        bench = bench.select(data.load_split_indices(args.split_file, len(bench)))
    if len(bench) == 0:
        raise ValueError("The benchmark has no rows to evaluate (empty dataset or split).")
    table = ImageTable()
    view_keys = [table.add_column(bench.positives, c, "positives") for c in bench.view_columns]
    source_keys = {name: [table.add_column(bench.sources[name], c, f"source {name}") for c in columns]
                   for name, columns in bench.distractor_columns.items()}

    scorer = Scorer(args.model, args.revision, args.device, DTYPES[args.dtype])
    cache, skipped = embed_table(scorer, table, args, state)
    if not state.is_main_process:
        return None
    embedded = [k for k in table.items if k in cache]
    if not embedded:
        raise ValueError(f"None of the {len(table.items)} images could be embedded; see the skipped list: {skipped[:3]}")
    dim = len(cache.get(embedded[0]))
    views, view_mask = stacked(cache, view_keys, dim)
    per_source, margins = {}, {}
    for name, keys in source_keys.items():
        distractors, distractor_mask = stacked(cache, keys, dim)
        margins[name] = metrics.nearid_margins(views, distractors, view_mask, distractor_mask)
        per_source[name] = metrics.nearid_scores(*margins[name])
    summary = pooled_summary(margins)
    stats = embedding_stats(scorer, table)
    write_nearid_outputs(args, scorer, bench, per_source, margins, summary, skipped, dataset_provenance, stats)
    return {"per_source": per_source, **summary, "embedding": stats}


def pooled_summary(margins):
    """Table-1 average over the 7 paper settings when all are present; always the pool of all given."""
    given = [s for s in margins if not s.startswith("fluxc")]
    summary = {"pooled_given": metrics.nearid_pooled_scores(margins, sources=given)} if given else {}
    if all(s in margins for s in metrics.NEARID_TABLE1_SOURCES):
        summary["table1_average"] = metrics.nearid_pooled_scores(margins)
    return summary


def nearid_rows(bench, margins):
    rows = []
    ids = list(bench.positives.select_columns(["id"])["id"])
    for name, (margin, valid) in margins.items():
        for row, sample_id in enumerate(ids):
            terms = margin[row][valid[row]]
            rows.append({"row": row, "id": sample_id, "source": name, "n_terms": int(valid[row].sum()),
                         "n_wins": int((terms > 0).sum()), "all_win": bool(len(terms) and (terms > 0).all()),
                         "min_margin": float(terms.min()) if len(terms) else None})
    return rows


def write_nearid_outputs(args, scorer, bench, per_source, margins, summary, skipped, dataset_provenance, stats):
    out = Path(args.output_dir)
    headline = summary.get("table1_average", summary.get("pooled_given"))
    metrics_out = {"per_source": per_source, **summary}
    prov = reports.provenance(scorer.provenance(), list(dataset_provenance.values()), args.split_file,
                              extra={"embedding": stats})
    document = reports.results_document("nearid", scorer.provenance(), metrics_out, prov, skipped)
    table = reports.per_source_markdown(per_source)
    table += "\n\n" + reports.table1_markdown({scorer.spec: reports.table1_row(nearid=headline)})
    reports.write_per_sample_csv(out / "nearid_per_sample.csv", nearid_rows(bench, margins))
    reports.plot_margin_histograms(out / "nearid_margins.png",
                                   {n: m[v] for n, (m, v) in margins.items()})
    reports.plot_ssr_pa(out / "nearid_ssr_pa.png", per_source)
    reports.atomic_write_text(out / "nearid_table.md", table + "\n")
    reports.atomic_write_json(out / "nearid_results.json", document)  # last: its presence means complete
    print(table)


# --- dreambench ------------------------------------------------------------------------------------


def dreambench_scores_from_images(args, state):
    """{method: {key: 100 x cosine}} for every generated image against its reference; scorer provenance."""
    methods = args.methods or data.dreambench_methods(args.samples)
    table, pairs = ImageTable(), {}
    for method in methods:
        triples = data.dreambench_pairs(args.samples, method)
        pairs[method] = ([k for k, _, _ in triples], table.add_files([s for _, s, _ in triples]),
                         table.add_files([t for _, _, t in triples]))
    scorer = Scorer(args.model, args.revision, args.device, DTYPES[args.dtype])
    cache, skipped = embed_table(scorer, table, args, state)
    scores = {}
    for method, (keys, src, tgt) in pairs.items():
        scores[method] = {k: float(100 * np.dot(cache.get(s), cache.get(t)))
                          for k, s, t in zip(keys, src, tgt) if s in cache and t in cache}
    return scores, {**scorer.provenance(), "embedding": embedding_stats(scorer, table)}, skipped


def run_dreambench(args, state):
    if args.scores_from:
        methods = args.methods or list(metrics.DREAMBENCH_METHODS)
        scores = metrics.load_dreambench_scores(args.ratings, args.scores_from, methods)
        scorer, skipped = {"spec": f"score files {args.scores_from}"}, []
    else:
        scores, scorer, skipped = dreambench_scores_from_images(args, state)
        methods = list(scores)
    if not state.is_main_process:
        return None
    human = metrics.load_dreambench_human(args.ratings, methods)
    result = metrics.dreambench_mh(scores, human, methods, scorer=scorer["spec"])
    out = Path(args.output_dir)
    if not args.scores_from:
        for method, method_scores in scores.items():  # the published per-image score format
            reports.atomic_write_json(out / "dreambench_scores" / f"{method}.json", method_scores)
    prov = reports.provenance(scorer, [{"kind": "local", "path": str(args.ratings)}])
    document = reports.results_document("dreambench", scorer, result, prov, skipped)
    table = reports.table1_markdown({scorer["spec"]: reports.table1_row(dreambench=result)})
    reports.atomic_write_text(out / "dreambench_table.md", table + "\n")
    reports.atomic_write_json(out / "dreambench_results.json", document)
    print(table)
    print("MH per category: " + ", ".join(f"{k[3:]} {v:.4f}" for k, v in result.items() if k.startswith("mh_")))
    return result


# --- command line ----------------------------------------------------------------------------------


def _source(text):
    name, sep, location = text.partition("=")
    if not sep or not name or not location:
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE (e.g. flux=Aleksandar/NearID-Flux), got {text!r}")
    return name, location


def _common(parser, needs_model=True):
    parser.add_argument("--model", required=needs_model, help="scorer spec: NearID id/folder or KIND:MODEL")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the model")
    parser.add_argument("--output-dir", default="eval_outputs", help="where results are written")
    parser.add_argument("--cache-dir", default=".cache/embeddings", help="embedding cache ('' disables)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes for decoding")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable images out (listed in the results) instead of stopping")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    nearid = modes.add_parser("nearid", help="NearID benchmark: SSR and PA per distractor source")
    _common(nearid)
    nearid.add_argument("--positives", required=True, help="positives dataset (Hub id, folder, parquet)")
    nearid.add_argument("--source", type=_source, action="append", required=True,
                        help="distractor source NAME=SOURCE; repeat for several")
    nearid.add_argument("--split-file", help="JSON list of row indices to evaluate (e.g. the test split)")
    dreambench = modes.add_parser("dreambench", help="DreamBench++ metric-to-human correlation (MH)")
    _common(dreambench, needs_model=False)
    dreambench.add_argument("--ratings", required=True, help="ratings folder (data_human_rating/...)")
    dreambench.add_argument("--scores-from", help="scorer folder under --ratings to read instead of embedding")
    dreambench.add_argument("--samples", help="samples folder: <method>/{src_image,tgt_image}/...")
    dreambench.add_argument("--methods", nargs="+", help="methods to use (default: all found)")
    return parser


def main(argv=None):
    from accelerate import PartialState

    args = build_parser().parse_args(argv)
    args.cache_dir = args.cache_dir or None
    if args.mode == "dreambench" and not args.scores_from and not (args.model and args.samples):
        raise SystemExit("dreambench needs either --scores-from FOLDER, or --model SPEC and --samples DIR.")
    state = PartialState()
    run = {"nearid": run_nearid, "dreambench": run_dreambench}[args.mode]
    return run(args, state)


if __name__ == "__main__":
    main(sys.argv[1:])
