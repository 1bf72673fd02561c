"""Evaluate identity scorers on the NearID, MTG and DreamBench++ benchmarks of the paper, or score
your own generated images against their references.

    python evaluate.py nearid --model SPEC --positives SRC --source flux=SRC [--source ...] [--split-file F]
    python evaluate.py mtg --model SPEC [--dataset SRC] [--split test]
    python evaluate.py dreambench --ratings DIR (--scores-from FOLDER | --model SPEC --samples DIR)
    python evaluate.py score --model SPEC (--samples DIR | --metadata FILE [--images DIR])

SPEC is a scorer (see nearid_scorers: `Aleksandar/nearid-siglip2`, `clip:...`, `dinov2:...`,
`siglip:...`, `siglip-mean:...`); SRC a Hub dataset id, a `save_to_disk` folder or parquet.
Every unique image is decoded and embedded once per run, and embeddings are cached on disk
(`--cache-dir`), so a second identical run performs no forward pass. Runs under
`accelerate launch` split the images between processes; the results are the same.
Outputs (under --output-dir): results JSON with provenance, a markdown table, a per-sample CSV
and PNG plots, all written atomically by the main process, the results JSON last. The benchmark
modes can also record their headline metrics in a model card's `model-index` (--model-index).
Run `python evaluate.py MODE --help` for each mode's options.
"""

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch

from nearid import data
from nearid import metrics
from nearid import reports
from nearid.io import atomic_write_bytes, atomic_write_json, atomic_write_text, write_csv
from nearid.embedding import EmbeddingCache, embed_missing, embedding_matrix, slot_embeddings
from nearid.scorers import Scorer

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


def embedding_dim(cache, table, skipped):
    """Length of the run's embeddings; a clear error when no image of the run could be embedded."""
    embedded = next((k for k in table.items if k in cache), None)
    if embedded is None:
        raise ValueError(f"None of the {len(table.items)} images could be embedded; see the skipped list: "
                         f"{skipped[:3]}")
    return len(cache.get(embedded))


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
    dim = embedding_dim(cache, table, skipped)
    views, view_mask = slot_embeddings(cache, view_keys, dim)
    per_source, margins = {}, {}
    for name, keys in source_keys.items():
        distractors, distractor_mask = slot_embeddings(cache, keys, dim)
        margins[name] = metrics.nearid_margins(views, distractors, view_mask, distractor_mask)
        per_source[name] = metrics.nearid_scores(*margins[name])
    summary = pooled_summary(margins)
    stats = embedding_stats(scorer, table)
    write_nearid_outputs(args, scorer, bench, per_source, margins, summary, skipped, dataset_provenance, stats)
    split = Path(args.split_file).stem if args.split_file else "train"
    write_model_index(args, "nearid", summary.get("table1_average", summary.get("pooled_given")), split, scorer.spec)
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
    # The results file vouches for the files beside it: drop a previous run's before replacing them,
    # so a failure part-way leaves no results file rather than old results over a mix of files.
    (out / "nearid_results.json").unlink(missing_ok=True)
    write_csv(out / "nearid_per_sample.csv", nearid_rows(bench, margins))
    reports.plot_margin_histograms(out / "nearid_margins.png",
                                   {n: m[v] for n, (m, v) in margins.items()})
    reports.plot_ssr_pa(out / "nearid_ssr_pa.png", per_source)
    atomic_write_text(out / "nearid_table.md", table + "\n")
    atomic_write_json(out / "nearid_results.json", document)  # last: its presence means complete
    print(table)


# --- mtg -------------------------------------------------------------------------------------------

# The 4 embedded images of an MTG row: the originals o1, o2 and their part-inpainted versions i1, i2.
MTG_IMAGES = {"o1": "image_1_original", "i1": "image_1_inpainted",
              "o2": "image_2_original", "i2": "image_2_inpainted"}
# The 5 similarities of the MTG metrics as (name, image, image), in `metrics.mtg_scores` argument order.
MTG_SIMILARITIES = (("s12", "o1", "o2"), ("s11p", "o1", "i1"), ("s22p", "o2", "i2"),
                    ("s12p", "o1", "i2"), ("s21p", "o2", "i1"))
# The 4 correlations of MO as (similarity, view of the oracle); the first two make MOpair.
MTG_CORRELATIONS = (("s11p", 1), ("s22p", 2), ("s12p", 2), ("s21p", 1))


def run_mtg(args, state):
    dataset, dataset_provenance = data.open_mtg(args.dataset, args.split, args.dataset_revision)
    table = ImageTable()
    keys = {slot: table.add_column(dataset, column, "MTG") for slot, column in MTG_IMAGES.items()}
    row_skipped = missing_mtg_images(keys, args.skip_bad_images)
    oracles, oracle_skipped = mtg_oracles(dataset, args.skip_bad_images)

    scorer = Scorer(args.model, args.revision, args.device, DTYPES[args.dtype])
    cache, skipped = embed_table(scorer, table, args, state)
    if not state.is_main_process:
        return None
    sims = mtg_similarities(cache, keys, embedding_dim(cache, table, skipped))
    scored = mtg_scored_rows(sims, oracles)
    if scored.sum() < 2:
        raise ValueError(f"only {int(scored.sum())} of {len(dataset)} MTG rows could be scored; the correlations "
                         f"need at least 2. Left out: {(skipped + row_skipped + oracle_skipped)[:3]}")
    scores = metrics.mtg_scores(*(sims[name][scored] for name, _, _ in MTG_SIMILARITIES),
                                oracles[scored, 0], oracles[scored, 1])
    scores.update(n_rows_dataset=len(dataset), n_rows_unscored=int((~scored).sum()))
    stats = embedding_stats(scorer, table)
    write_mtg_outputs(args, scorer, scores, sims, oracles, skipped + row_skipped + oracle_skipped,
                      dataset_provenance, stats)
    write_model_index(args, "mtg", scores, args.split, scorer.spec)
    return {**scores, "embedding": stats}


def missing_mtg_images(keys, skip_errors):
    """Skipped-list entries for absent (None) MTG images; an error unless `skip_errors`."""
    skipped = [{"image": f"MTG row {row} column {MTG_IMAGES[slot]}", "reason": "missing image"}
               for slot, slot_keys in keys.items() for row, key in enumerate(slot_keys) if key is None]
    if skipped and not skip_errors:
        raise ValueError(f"{skipped[0]['image']} has no image ({len(skipped)} missing in all); every MTG row "
                         "needs its 4 images. Pass --skip-bad-images to leave such rows out")
    return skipped


def mtg_oracles(dataset, skip_errors):
    """[N, 2] oracle of view 1 and 2 of every row and the skipped list.

    A row whose masks cannot be read, or whose object mask is empty (the oracle is undefined), is
    an error, or with `skip_errors` NaN and listed.
    """
    columns = [f"image_{view}_{kind}_mask" for view in (1, 2) for kind in ("object", "part")]
    refs = {c: data.image_refs(dataset, c, range(len(dataset))) for c in columns}
    oracles, skipped = np.full((len(dataset), 2), np.nan), []
    for row in range(len(dataset)):
        for view in (1, 2):
            where = f"MTG row {row} view {view}"
            try:
                masks = data.mtg_masks(refs[f"image_{view}_object_mask"][row], refs[f"image_{view}_part_mask"][row],
                                       where)
                oracles[row, view - 1] = metrics.mtg_oracle(*masks)
            except ValueError as error:  # ImageReadError (names `where` itself), or an empty object mask
                reason = str(error) if isinstance(error, data.ImageReadError) else f"{where}: {error}"
                if not skip_errors:
                    raise type(error)(f"{reason}. Fix the row, or pass --skip-bad-images to leave it out") from error
                skipped.append({"image": where, "reason": reason})
    return oracles, skipped


def mtg_similarities(cache, keys, dim):
    """{name: [N] cosine similarity} for `MTG_SIMILARITIES`; NaN where either image is absent."""
    embedded = {slot: embedding_matrix(cache, slot_keys, dim) for slot, slot_keys in keys.items()}
    sims = {}
    for name, a, b in MTG_SIMILARITIES:
        (emb_a, present_a), (emb_b, present_b) = embedded[a], embedded[b]
        dots = np.einsum("nd,nd->n", emb_a.astype(np.float64), emb_b.astype(np.float64))
        sims[name] = np.where(present_a & present_b, dots, np.nan)
    return sims


def mtg_scored_rows(sims, oracles):
    """[N] bool: rows with both oracles and all 5 similarities (nothing missing or skipped)."""
    return np.isfinite(oracles).all(1) & np.isfinite(np.stack(list(sims.values()), 1)).all(1)


def _finite_or_none(value):
    return float(value) if np.isfinite(value) else None


def mtg_rows(sims, oracles):
    """Per-row CSV records: oracles, the 5 similarities, both margins and whether both win."""
    rows = []
    for row, (oracle1, oracle2) in enumerate(oracles):
        sim = {name: values[row] for name, values in sims.items()}
        m1, m2 = sim["s12"] - sim["s11p"], sim["s12"] - sim["s22p"]
        scored = bool(np.isfinite([oracle1, oracle2, *sim.values()]).all())
        rows.append({"row": row, "scored": scored, "oracle1": _finite_or_none(oracle1),
                     "oracle2": _finite_or_none(oracle2), **{k: _finite_or_none(v) for k, v in sim.items()},
                     "m1": _finite_or_none(m1), "m2": _finite_or_none(m2),
                     "both_win": bool(m1 > 0 and m2 > 0) if scored else None})
    return rows


def mtg_markdown(scorer_spec, scores):
    """Table-1 row of the MTG columns, then the 4 correlations behind MO."""
    lines = ["| similarity | oracle | Pearson r |", "|---|---|---|"]
    lines += [f"| {name} | oracle{view} | {scores[f'r_{name}_oracle{view}']:.4f} |" for name, view in MTG_CORRELATIONS]
    return (reports.table1_markdown({scorer_spec: reports.table1_row(mtg=scores)}) + "\n"
            + "\n".join(lines) + f"\n\n{scores['n_rows']} of {scores['n_rows_dataset']} rows scored.\n")


def plot_mtg_similarity_vs_oracle(path, sims, oracles, scores):
    """2x2 scatter of each similarity behind MO against its oracle (scored rows), r in the titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global backend switch
    images = {name: (a, b) for name, a, b in MTG_SIMILARITIES}
    for ax, (name, view) in zip(fig.subplots(2, 2).flat, MTG_CORRELATIONS):
        ax.scatter(oracles[:, view - 1], sims[name], s=14, alpha=0.7)
        ax.set_title(f"{name} vs oracle{view}: r = {scores[f'r_{name}_oracle{view}']:.3f}", fontsize=10)
        ax.set_xlabel(f"oracle{view}: share of object {view} left unchanged", fontsize=8)
        ax.set_ylabel(f"{name} = cos({images[name][0]}, {images[name][1]})", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"MTG: similarity vs oracle, {scores['n_rows']} rows "
                 f"(MO {scores['mo']:.3f}, MOpair {scores['mo_pair']:.3f})", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def write_mtg_outputs(args, scorer, scores, sims, oracles, skipped, dataset_provenance, stats):
    out = Path(args.output_dir)
    prov = reports.provenance(scorer.provenance(), [dataset_provenance], extra={"embedding": stats})
    document = reports.results_document("mtg", scorer.provenance(), scores, prov, skipped)
    table = mtg_markdown(scorer.spec, scores)
    scored = mtg_scored_rows(sims, oracles)
    (out / "mtg_results.json").unlink(missing_ok=True)  # as in nearid: no old results over new files
    write_csv(out / "mtg_per_sample.csv", mtg_rows(sims, oracles))
    plot_mtg_similarity_vs_oracle(out / "mtg_similarity_vs_oracle.png", {k: v[scored] for k, v in sims.items()},
                                  oracles[scored], scores)
    atomic_write_text(out / "mtg_table.md", table)
    atomic_write_json(out / "mtg_results.json", document)  # last: its presence means complete
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
        scores = data.load_dreambench_scores(args.ratings, args.scores_from, methods)
        scorer, skipped = {"spec": f"score files {args.scores_from}"}, []
    else:
        scores, scorer, skipped = dreambench_scores_from_images(args, state)
        methods = list(scores)
    if not state.is_main_process:
        return None
    human = data.load_dreambench_human(args.ratings, methods)
    result = metrics.dreambench_mh(scores, human, methods, scorer=scorer["spec"])
    out = Path(args.output_dir)
    (out / "dreambench_results.json").unlink(missing_ok=True)  # as in write_nearid_outputs
    if not args.scores_from:
        for method, method_scores in scores.items():  # the published per-image score format
            atomic_write_json(out / "dreambench_scores" / f"{method}.json", method_scores)
    prov = reports.provenance(scorer, [{"kind": "local", "path": str(args.ratings)}])
    document = reports.results_document("dreambench", scorer, result, prov, skipped)
    table = reports.table1_markdown({scorer["spec"]: reports.table1_row(dreambench=result)})
    atomic_write_text(out / "dreambench_table.md", table + "\n")
    atomic_write_json(out / "dreambench_results.json", document)
    print(table)
    print("MH per category: " + ", ".join(f"{k[3:]} {v:.4f}" for k, v in result.items() if k.startswith("mh_")))
    write_model_index(args, "dreambench", result, None, scorer["spec"])
    return result


# --- score -----------------------------------------------------------------------------------------


def run_score(args, state):
    if args.samples:
        items, source = data.score_items_from_layout(args.samples, args.methods), args.samples
    else:
        items, source = data.read_score_metadata(args.metadata, args.images), args.metadata
    table = ImageTable()
    generated = table.add_files([item.path(item.generated) for item in items])
    references = [table.add_files([item.path(r) for r in item.references]) for item in items]

    scorer = Scorer(args.model, args.revision, args.device, DTYPES[args.dtype])
    cache, skipped = embed_table(scorer, table, args, state)
    if not state.is_main_process:
        return None
    embedding_dim(cache, table, skipped)  # fails clearly when nothing could be embedded
    records, unscored = score_records(items, generated, references, cache)
    if not records:
        raise ValueError(f"none of the {len(items)} generated images could be scored: {unscored[:3]}")
    summary = summarize_scores(records)
    stats = embedding_stats(scorer, table)
    write_score_outputs(args, scorer, records, summary, skipped + unscored, source, stats)
    return {"summary": summary, "records": records, "embedding": stats}


def score_records(items, generated_keys, reference_keys, cache):
    """One record per generated image: its similarity to each readable reference, their mean and max.

    Returns (records, unscored): images whose own file or all of whose references could not be
    embedded (with --skip-bad-images) are not scored but listed with a reason.
    """
    records, unscored = [], []
    for item, generated, references in zip(items, generated_keys, reference_keys):
        usable = [(name, key) for name, key in zip(item.references, references) if key in cache]
        if generated not in cache or not usable:
            reason = "generated image unreadable" if generated not in cache else "no readable reference"
            unscored.append({"image": item.generated, "reason": f"not scored: {reason}"})
            continue
        sims = {name: float(np.dot(cache.get(generated).astype(np.float64), cache.get(key))) for name, key in usable}
        records.append({"method": item.method, "subject": item.subject, "generated": item.generated,
                        "n_references": len(sims), "score_mean": float(np.mean(list(sims.values()))),
                        "score_max": max(sims.values()), "best_reference": max(sims, key=sims.get),
                        "references": sims})
    return records, unscored


def score_statistics(values):
    """mean, median, std (population, ddof 0), min and max of a non-empty list of scores."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def summarize_group(records):
    return {"n_images": len(records), "n_subjects": len({r["subject"] for r in records}),
            "n_references": len({name for r in records for name in r["references"]}),
            "score_mean": score_statistics([r["score_mean"] for r in records]),
            "score_max": score_statistics([r["score_max"] for r in records])}


def summarize_scores(records):
    """Statistics of the per-image scores, per method: `{method: {"overall": group, "subjects":
    {subject: group}}}`, each group `summarize_group`: counts, and `score_statistics` of the
    images' mean (`score_mean`) and max (`score_max`) similarity to their references."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        subjects = sorted({r["subject"] for r in rows})
        summary[method] = {"overall": summarize_group(rows),
                           "subjects": {s: summarize_group([r for r in rows if r["subject"] == s]) for s in subjects}}
    return summary


def score_markdown(summary):
    """One table per method: a row per subject and one for all its images."""
    header = ("| subject | images | references | mean | median | std | max-ref mean | max-ref median | "
              "max-ref std |\n|---|---|---|---|---|---|---|---|---|")
    parts = ["Cosine similarity of each generated image to its reference(s): `mean` columns summarise each "
             "image's mean over its references, `max-ref` ones its best reference.\n"]
    for method, groups in summary.items():
        lines = [f"### {method}\n", header]
        for name, group in [*groups["subjects"].items(), ("**all**", groups["overall"])]:
            a, b = group["score_mean"], group["score_max"]
            lines.append(f"| {name} | {group['n_images']} | {group['n_references']} | {a['mean']:.4f} | "
                         f"{a['median']:.4f} | {a['std']:.4f} | {b['mean']:.4f} | {b['median']:.4f} | {b['std']:.4f} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def write_score_outputs(args, scorer, records, summary, skipped, source, stats):
    out = Path(args.output_dir)
    prov = reports.provenance(scorer.provenance(), [{"kind": "local", "path": str(Path(source).resolve())}],
                              extra={"embedding": stats})
    document = reports.results_document("score", scorer.provenance(), summary, prov, skipped)
    markdown = score_markdown(summary)
    (out / "score_results.json").unlink(missing_ok=True)  # as in nearid: no old results over new files
    write_csv(out / "score_per_image.csv",
                                 [{k: v for k, v in r.items() if k != "references"} for r in records])
    atomic_write_json(out / "score_per_image.json", records)
    atomic_write_text(out / "score_summary.md", markdown)
    atomic_write_json(out / "score_results.json", document)  # last: its presence means complete
    print(markdown)


# --- model card ------------------------------------------------------------------------------------

# The Hub dataset each benchmark's results are recorded under, whichever copy (Hub or local) was
# read, and the metrics written: (key in the mode's metrics, display name).
CARD_DATASETS = {"nearid": ("Aleksandar/NearID", "NearID benchmark"),
                 "mtg": ("abdo-eldesokey/mtg-dataset", "MTG"),
                 "dreambench": ("yuangpeng/dreambench_plus", "DreamBench++")}
CARD_METRICS = {"nearid": (("ssr", "NearID SSR"), ("pa", "NearID PA")),
                "mtg": (("mo", "MTG MO"), ("mo_pair", "MTG MOpair"), ("ssr", "MTG SSR"), ("pa", "MTG PA")),
                "dreambench": (("mh_object", "DB++ MH (object)"), ("mh_all", "DB++ MH (all)"))}


def model_card_results(benchmark, values, split):
    """`huggingface_hub.EvalResult` fields of a benchmark's finite headline metrics (4 decimals)."""
    dataset_type, dataset_name = CARD_DATASETS[benchmark]
    return [{"task_type": "image-feature-extraction", "dataset_type": dataset_type, "dataset_name": dataset_name,
             "dataset_split": split, "metric_type": key, "metric_name": name,
             "metric_value": round(float(values[key]), 4)}
            for key, name in CARD_METRICS[benchmark] if np.isfinite(values.get(key, np.nan))]


def write_model_index(args, benchmark, values, split, scorer_spec):
    """With --model-index CARD, record the headline metrics in the card's `model-index` metadata."""
    if not args.model_index:
        return
    results = model_card_results(benchmark, values or {}, split)
    if not results:
        print(f"No finite {benchmark} headline metric to record; {args.model_index} left as it was.")
        return
    name = args.model_index_name or _card_model_name(args.model_index) or Path(scorer_spec.rstrip("/")).name
    reports.update_model_card(args.model_index, name, results)
    print(f"Recorded {', '.join(r['metric_name'] for r in results)} in the model-index of {args.model_index} "
          f"(model {name!r}).")


def _card_model_name(readme):
    """The card's current model-index name, or None (update_model_card explains a broken card)."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.model_name
    except (ValueError, yaml.YAMLError):
        return None


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable images out (listed in the results) instead of stopping")


SCORE_DESCRIPTION = """Score your own generated images against reference images.

Inputs, one of:
  --samples DIR     mirrored layout, as DreamBench++: DIR/src_image/<rel> is the reference of the
                    generated image DIR/tgt_image/<rel>; or several methods, DIR/<method>/{src_image,
                    tgt_image}/<rel>. The subject of an image is the first folder of <rel>.
  --metadata FILE   a CSV (header line), JSONL (one object per line) or JSON (list of objects) file
                    with columns generated, reference and optionally subject, method. A generated
                    image may have several references: one CSV line per reference, or a JSON list.
                    Paths are relative to --images (default: the metadata file's folder).

Per image: cosine similarity to each reference, their mean and max. Per method and subject: count,
mean, median, std, min, max of both. Outputs: score_per_image.csv, score_per_image.json,
score_summary.md, score_results.json (written last).
"""


def _add_nearid(modes):
    nearid = modes.add_parser("nearid", help="NearID benchmark: SSR and PA per distractor source",
                              description="NearID benchmark: SSR and PA per distractor source, and "
                                          "pooled. Writes nearid_results.json (last), nearid_table.md, "
                                          "nearid_per_sample.csv, nearid_margins.png, nearid_ssr_pa.png.")
    _common(nearid)
    nearid.add_argument("--positives", required=True, help="positives dataset (Hub id, folder, parquet)")
    nearid.add_argument("--source", type=_source, action="append", required=True,
                        help="distractor source NAME=SOURCE; repeat for several")
    nearid.add_argument("--split-file", help="JSON list of row indices to evaluate (e.g. the test split)")
    _model_card_options(nearid)


def _add_mtg(modes):
    mtg = modes.add_parser("mtg", help="MTG part-level benchmark: MO, MOpair, SSR and PA",
                           description="MTG part-level benchmark: oracles from the masks, 5 "
                                       "similarities per row, MO, MOpair, SSR, PA. Writes mtg_results.json "
                                       "(last), mtg_table.md, mtg_per_sample.csv, mtg_similarity_vs_oracle.png.")
    _common(mtg)
    mtg.add_argument("--dataset", default="abdo-eldesokey/mtg-dataset",
                     help="MTG dataset: Hub id, save_to_disk folder (Dataset or DatasetDict) or parquet")
    mtg.add_argument("--split", default="test", help="split of a Hub dataset or DatasetDict folder")
    mtg.add_argument("--dataset-revision", help="Hub revision (branch, tag or commit) of the dataset")
    _model_card_options(mtg)


def _add_dreambench(modes):
    dreambench = modes.add_parser("dreambench", help="DreamBench++ metric-to-human correlation (MH)",
                                  description="DreamBench++ MH from published score files or by "
                                              "scoring a samples folder. Writes dreambench_results.json "
                                              "(last), dreambench_table.md and, from images, "
                                              "dreambench_scores/<method>.json.")
    _common(dreambench, needs_model=False)
    dreambench.add_argument("--ratings", required=True, help="ratings folder (data_human_rating/...)")
    dreambench.add_argument("--scores-from", help="scorer folder under --ratings to read instead of embedding")
    dreambench.add_argument("--samples", help="samples folder: <method>/{src_image,tgt_image}/...")
    dreambench.add_argument("--methods", nargs="+", help="methods to use (default: all found)")
    _model_card_options(dreambench)


def _add_score(modes):
    score = modes.add_parser("score", help="score your own generated images against references",
                             description=SCORE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(score)
    inputs = score.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--samples", help="mirrored layout: DIR/{src_image,tgt_image}/... or "
                                          "DIR/<method>/{src_image,tgt_image}/...")
    inputs.add_argument("--metadata", help="CSV, JSON or JSONL file: generated, reference[, subject, method]")
    score.add_argument("--images", help="folder the --metadata paths are relative to (default: its folder)")
    score.add_argument("--methods", nargs="+", help="with --samples: method folders to score (default: all)")


def _model_card_options(parser):
    parser.add_argument("--model-index", metavar="README",
                        help="model card whose model-index metadata receives the headline metrics after the "
                             "run; the rest of the card is kept byte for byte")
    parser.add_argument("--model-index-name", help="model name in the model-index (default: the card's "
                                                   "current one, else the name of --model)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for add_mode in (_add_nearid, _add_mtg, _add_dreambench, _add_score):
        add_mode(modes)
    return parser


def check_arguments(args):
    """Combinations argparse cannot express; raises SystemExit with what to do."""
    if args.mode == "dreambench" and not args.scores_from and not (args.model and args.samples):
        raise SystemExit("dreambench needs either --scores-from FOLDER, or --model SPEC and --samples DIR.")
    if args.mode == "score" and args.images and not args.metadata:
        raise SystemExit("score: --images goes with --metadata (the folder its paths are relative to).")
    if args.mode == "score" and args.methods and not args.samples:
        raise SystemExit("score: --methods picks method folders of --samples; with --metadata, use its "
                         "method column.")
    if getattr(args, "model_index", None) and not Path(args.model_index).is_file():
        raise SystemExit(f"--model-index {args.model_index}: no such file; give the model card (README.md) "
                         "to record the results in.")


def main(argv=None):
    from accelerate import PartialState

    args = build_parser().parse_args(argv)
    args.cache_dir = args.cache_dir or None
    check_arguments(args)
    # cpu=True is what makes accelerate join the processes of a CPU launch (gloo); without it
    # every process would run alone and embed every image.
    state = PartialState(cpu=args.device == "cpu")
    if args.device == "cuda":
        args.device = str(state.device)  # under a multi-GPU launch, each process on its own GPU
    run = {"nearid": run_nearid, "mtg": run_mtg, "dreambench": run_dreambench, "score": run_score}[args.mode]
    return run(args, state)


if __name__ == "__main__":
    main(sys.argv[1:])
