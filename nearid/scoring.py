"""Scoring generated images against their references: per-image records, summaries and tables.

Used by `evaluate.py score` and by the Python API (`nearid.api`), so both give the same numbers for
the same files. The inputs are `ScoreItem`s
(`nearid.data.score_inputs`): a generated image, its reference image(s), its subject and method. Each
generated image gets the cosine similarity to every reference, their mean (`score_mean`) and max
(`score_max`); images that could not be scored (an unreadable file, or no readable reference)
are listed with the reason, and counted in the summaries and tables beside the scored ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nearid.reports.results_file import skipped_by_reason


def index_items(items: Sequence, index) -> tuple:
    """Register the images of `items` in an `ImageIndex`: (generated keys, [reference keys per item])."""
    generated = index.add_files([item.path(item.generated) for item in items])
    references = [index.add_files([item.path(r) for r in item.references]) for item in items]
    return generated, references


NOT_SCORED_UNREADABLE = "not scored: generated image unreadable"
NOT_SCORED_NO_REFERENCE = "not scored: no readable reference"


def score_records(items: Sequence, generated_keys: Sequence, reference_keys: Sequence, vectors: Mapping) -> tuple:
    """(records, unscored): one record per generated image that could be scored, and one entry
    {"image", "method", "subject", "reason"} per image that could not."""
    records, unscored = [], []
    for item, generated, references in zip(items, generated_keys, reference_keys):
        usable = [(name, key) for name, key in zip(item.references, references) if key in vectors]
        if generated not in vectors or not usable:
            reason = NOT_SCORED_UNREADABLE if generated not in vectors else NOT_SCORED_NO_REFERENCE
            unscored.append({"image": item.generated, "method": item.method, "subject": item.subject,
                             "reason": reason})
            continue
        generated_vector = np.asarray(vectors[generated], dtype=np.float64)
        sims = {name: float(np.dot(generated_vector, vectors[key])) for name, key in usable}
        records.append({"method": item.method, "subject": item.subject, "generated": item.generated,
                        "n_references": len(sims), "n_references_unreadable": len(item.references) - len(sims),
                        "score_mean": float(np.mean(list(sims.values()))), "score_max": max(sims.values()),
                        "best_reference": max(sims, key=sims.get), "references": sims})
    return records, unscored


def left_out(unreadable: Sequence, unscored: Sequence, other_files: Sequence = ()) -> list:
    """Every image or file a scoring run left out, each once, as {"image", "reason", ...}.

    unreadable: the images the embedding step could not read (`Embedded.skipped`); unscored: from
    `score_records` (a generated image that is itself unreadable is already in `unreadable`, so it is
    not listed again); other_files: `[(file, reason)]` of files that are not images.
    """
    entries = [dict(entry) for entry in unreadable]
    entries += [dict(entry) for entry in unscored if entry["reason"] != NOT_SCORED_UNREADABLE]
    return entries + [{"image": str(path), "reason": reason} for path, reason in other_files]


def summary_markdown(summary: Mapping, skipped: Sequence = (), unused: Sequence = (),
                     listed_in: str = "score_results.json") -> str:
    """The score summary of `evaluate.py score` (score_summary.md) and of `ScoreTable.markdown`: a table per
    method, the methods side by side when there are several, what was left out by reason (each listed, with
    its message, in `listed_in`) and the reference folders no method generated for."""
    text = score_markdown(summary)
    if len(summary) > 1:
        text += "\n### Methods side by side (mean identity score)\n\n" + methods_table(summary)
    if skipped:
        counts = skipped_by_reason(skipped)
        text += (f"\n{len(skipped)} images or files were left out "
                 f"({', '.join(f'{n} {reason}' for reason, n in counts.items())}); {listed_in} lists each with the "
                 "reason.\n")
    return text + unused_references_markdown(unused)


def unused_references_markdown(unused: Sequence) -> str:
    """A line naming the reference folders some method generated nothing for ('' when there are none)."""
    if not unused:
        return ""
    by_method: dict = {}
    for folder, method in unused:
        by_method.setdefault(method, []).append(Path(folder).name)
    listed = "; ".join(f"{method}: {', '.join(subjects)}" for method, subjects in by_method.items())
    return f"\nSubjects with references but no generations (not scored): {listed}.\n"


def score_statistics(values) -> dict:
    """mean, median, std (population, ddof 0), min and max of a list of scores (NaN when empty)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return dict.fromkeys(("mean", "median", "std", "min", "max"), float("nan"))
    return {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def summarize_group(records: Sequence, unscored: Sequence = ()) -> dict:
    return {"n_images": len(records), "n_skipped": len(unscored),
            "n_subjects": len({r["subject"] for r in [*records, *unscored]}),
            "n_references": len({name for r in records for name in r["references"]}),
            "score_mean": score_statistics([r["score_mean"] for r in records]),
            "score_max": score_statistics([r["score_max"] for r in records])}


def summarize_scores(records: Sequence, unscored: Sequence = ()) -> dict:
    """Per method: `{"overall": group, "subjects": {subject: group}}`, each group `summarize_group`:
    counts (scored and skipped images) and statistics of the images' `score_mean` and `score_max`."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in [*records, *unscored]):
        rows = [r for r in records if r["method"] == method]
        left_out = [r for r in unscored if r["method"] == method]
        subjects = sorted({r["subject"] for r in [*rows, *left_out]})
        summary[method] = {
            "overall": summarize_group(rows, left_out),
            "subjects": {s: summarize_group([r for r in rows if r["subject"] == s],
                                            [r for r in left_out if r["subject"] == s]) for s in subjects}}
    return summary


def _fmt(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.4f}"


def score_markdown(summary: Mapping) -> str:
    """One table per method: a row per subject and one for all its images, skipped images counted."""
    header = ("| subject | images | skipped | references | mean | median | std | min | max | max-ref mean | "
              "max-ref min | max-ref max |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    parts = ["Cosine similarity of each generated image to its reference(s): the `mean` to `max` columns "
             "summarise each image's mean over its references, `max-ref` ones its best reference. `skipped` "
             "counts generated images that could not be scored (listed in score_results.json).\n"]
    for method, groups in summary.items():
        lines = [f"### {method}\n", header]
        for name, group in [*groups["subjects"].items(), ("**all**", groups["overall"])]:
            a, b = group["score_mean"], group["score_max"]
            lines.append(f"| {name} | {group['n_images']} | {group['n_skipped']} | {group['n_references']} | "
                         f"{_fmt(a['mean'])} | {_fmt(a['median'])} | {_fmt(a['std'])} | {_fmt(a['min'])} | "
                         f"{_fmt(a['max'])} | {_fmt(b['mean'])} | {_fmt(b['min'])} | {_fmt(b['max'])} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def methods_table(summary: Mapping) -> str:
    """Methods side by side: a row per subject, a column per method, each cell the mean `score_mean`
    of that subject's generated images (with the skipped count when there are any)."""
    methods = list(summary)
    subjects = sorted({s for groups in summary.values() for s in groups["subjects"]})

    def cell(group):
        if group is None:
            return "–"
        text = _fmt(group["score_mean"]["mean"])
        return f"{text} ({group['n_skipped']} skipped)" if group["n_skipped"] else text

    lines = ["| subject | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for subject in subjects:
        lines.append(f"| {subject} | " + " | ".join(cell(summary[m]["subjects"].get(subject)) for m in methods) + " |")
    lines.append("| **all** | " + " | ".join(cell(summary[m]["overall"]) for m in methods) + " |")
    return "\n".join(lines) + "\n"
