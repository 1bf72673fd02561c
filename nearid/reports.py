"""Reports of NearID evaluations: results files, markdown tables, CSV, plots and the model card.

Everything here takes the flat metric dicts of `nearid.metrics` and writes them out; nothing
computes a metric. Files are written atomically through `nearid.io`. matplotlib is imported inside
the plotting functions, so `evaluate.py` imports this module cheaply; model cards are `nearid.card`'s.

- Results JSON: `provenance`, `results_document`.
- Markdown: `table1_row`, `table1_markdown`, `per_source_markdown`, `retrieval_markdown`, `mh_per_category`.
- Plots (PNG): `plot_margin_histograms`, `plot_ssr_pa`, `plot_retrieval`, `plot_image_grid` (contact sheets).
- A run's files: `RunOutputs` (stale files of the previous run removed, results JSON last).
"""

import datetime
import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nearid.io import atomic_path, atomic_write_json, require_folder
from nearid.metrics import NEARID_TABLE1_SOURCES

# Keys of one Table-1 row (`table1_row` builds them from the metric dicts), with the column header
# and the decimals the paper prints. SSR/PA are percentages; MO and MH are correlations.
NEARID_SSR, NEARID_PA = "nearid_ssr", "nearid_pa"
MTG_MO, MTG_MO_PAIR, MTG_SSR, MTG_PA = "mtg_mo", "mtg_mo_pair", "mtg_ssr", "mtg_pa"
DREAMBENCH_MH = "dreambench_mh"
TABLE1_COLUMNS = (
    ("NearID SSR", NEARID_SSR, 2),
    ("NearID PA", NEARID_PA, 2),
    ("MTG MO", MTG_MO, 3),
    ("MTG MOpair", MTG_MO_PAIR, 3),
    ("MTG SSR", MTG_SSR, 2),
    ("MTG PA", MTG_PA, 2),
    ("DB++ MH", DREAMBENCH_MH, 3),
)
MISSING = "\u2013"  # en dash, for a value that was not evaluated
# Table 1 of the paper (arXiv 2604.01973), as `table1_row` keys: what `evaluate.py table1` prints beside a row.
PAPER_TABLE1 = {
    "CLIP ViT-L/14 (paper)": (10.31, 20.92, 0.239, 0.484, 0.0, 0.0, 0.493),
    "DINOv2 ViT-L/14 (paper)": (20.43, 34.55, 0.324, 0.519, 0.0, 0.0, 0.492),
    "SigLIP2, frozen (paper)": (30.74, 48.81, 0.180, 0.366, 0.0, 0.0, 0.516),
    "VSM (paper)": (32.13, 46.70, 0.394, 0.445, 7.0, 24.5, 0.190),
    "NearID (paper)": (99.17, 99.71, 0.465, 0.486, 35.0, 46.5, 0.545),
}
# What the DreamBench++ aggregate keys mean: the "notes" of dreambench_results.json.
DREAMBENCH_NOTES = {
    "mh_object": "Table 1's DB++ column: MH of the object category, Fisher-z mean over the methods.",
    "mh_all_categories": "The authors' all-category MH: the Fisher-z mean of the four category values "
                         "(mh_object, mh_style, mh_live_subject_animal, mh_live_subject_human).",
    "mh_pooled_prompts": "One Pearson correlation per method over all prompts of all categories at once, then "
                         "the Fisher-z mean over methods. A different quantity from mh_all_categories, which "
                         "the authors call not meaningful (the categories differ in score range); kept for "
                         "comparison only.",
}
# Packages whose versions go into every results file (distribution names, PIL is "pillow").
PROVENANCE_PACKAGES = {"torch": "torch", "transformers": "transformers", "datasets": "datasets",
                       "huggingface_hub": "huggingface_hub", "numpy": "numpy", "PIL": "pillow"}
REPO_DIR = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# Results JSON


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """{"commit": HEAD sha or None, "dirty": tracked files modified (None without a checkout)}.

    Only a checkout whose top level is this file's folder (the repo root) counts, so a copy of the
    repo inside another git repository does not report that repository's commit.
    """
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != REPO_DIR:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sha256(path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def provenance(model: dict, datasets: list[dict], split_file: str | None = None,
               extra: dict | None = None) -> dict:
    """Where a result came from.

    Args:
        model: e.g. {"name_or_path", "revision", "scorer", "dtype"}; datasets: one dict per dataset
            (e.g. {"repo_id", "revision", "split"}); split_file: the sample split used, if any (its
            sha256 is recorded when it exists); extra: anything else (device, batch size, ...).

    Returns:
        {"model", "datasets", "split_file", "split_file_sha256", "versions" (python, nearid and
        `PROVENANCE_PACKAGES`, None if not installed), "git" ({"commit", "dirty"}),
        "date_utc" (ISO 8601), "command" (sys.argv), "platform", "extra"}. No hostname.
    """
    from nearid import __version__

    # The package's own version identifies the code where there is no git checkout (an installed package).
    versions = {"python": platform.python_version(), "nearid": __version__}
    versions.update({name: _version(dist) for name, dist in PROVENANCE_PACKAGES.items()})
    return {
        "model": dict(model),
        "datasets": [dict(d) for d in datasets],
        "split_file": None if split_file is None else str(split_file),
        "split_file_sha256": None if split_file is None else _sha256(split_file),
        "versions": versions,
        "git": git_state(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "platform": platform.platform(),
        "extra": dict(extra or {}),
    }


def _counts(metrics: Mapping, prefix: str = "") -> dict:
    """Integer `n_*` entries of a (possibly nested) metrics dict, nested keys joined by '/'."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(_counts(v, f"{prefix}{k}/"))
        elif str(k).split("/")[-1].startswith("n_") and isinstance(v, (int, np.integer)):
            out[f"{prefix}{k}"] = int(v)
    return out


# Short reasons for what a run left out, found by the phrases of the messages that say it (the decode's, in
# image_processing_nearid.py, and `nearid.images.find_images`'); the full message stays with each item.
SKIP_REASONS = (
    ("no such image file", "missing file"),
    ("cannot read image file", "unreadable"),
    ("could not decode", "unreadable"),
    ("not an image format", "not an image"),
    ("above the limit", "too large"),
    ("decompression-bomb limit", "too large"),
    ("it has no pixels", "no pixels"),
    ("neither bytes nor a path", "empty cell"),
    ("the mtg oracle needs both masks", "missing mask"),
    ("not in a <subject>/ folder", "outside a subject folder"),
)


def skip_reason(message: str) -> str:
    """The short reason of one left-out item's message, e.g. "unreadable" for "Could not decode image file
    'a.png' (12 bytes): ..."; a message that is already short and names no file is its own reason."""
    lower = message.lower()
    for phrase, reason in SKIP_REASONS:
        if phrase in lower:
            return reason
    return message if len(message) <= 48 and "'" not in message and "/" not in message else "other"


def skipped_by_reason(skipped: Sequence[Mapping]) -> dict:
    """{short reason: count} of left-out items ({"reason": message, ...}), the most frequent first."""
    counts: dict = {}
    for item in skipped:
        reason = skip_reason(item["reason"])
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def results_document(benchmark: str, scorer: dict, metrics: dict, provenance: dict,
                     skipped: list[dict], notes: Mapping | None = None) -> dict:
    """The results JSON of one (benchmark, scorer) run, in a fixed layout.

    Returns {"benchmark", "scorer", "metrics", "skipped" (one dict per left-out item, each with a
    "reason", its full message), "counts" ({"n_skipped", "skipped_by_reason" (short reasons,
    `skip_reason`), plus every integer `n_*` of `metrics`, nested keys joined by '/'}), "provenance"},
    and "notes" (metric key -> what it means) when given.
    """
    bad = [s for s in skipped if "reason" not in s]
    if bad:
        raise ValueError(f"every skipped item needs a 'reason'; got {bad[:3]}")
    by_reason = skipped_by_reason(skipped)
    return {
        "benchmark": benchmark,
        "scorer": dict(scorer),
        "metrics": dict(metrics),
        "skipped": [dict(s) for s in skipped],
        "counts": {"n_skipped": len(skipped), "skipped_by_reason": by_reason, **_counts(metrics)},
        "provenance": provenance,
        **({"notes": dict(notes)} if notes else {}),
    }


# --------------------------------------------------------------------------------------------------
# Markdown tables


def _fmt(value, decimals: int) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return MISSING
    return f"{float(value):.{decimals}f}"


def table1_row(nearid: Mapping | None = None, mtg: Mapping | None = None,
               dreambench: Mapping | None = None) -> dict:
    """Table-1 keys from metric dicts: `nearid_scores`/`nearid_pooled_scores` (ssr, pa),
    `mtg_scores` (mo, mo_pair, ssr, pa), `dreambench_mh` (mh_object). None -> keys left out."""
    row = {}
    if nearid is not None:
        row.update({NEARID_SSR: nearid["ssr"], NEARID_PA: nearid["pa"]})
    if mtg is not None:
        row.update({MTG_MO: mtg["mo"], MTG_MO_PAIR: mtg["mo_pair"], MTG_SSR: mtg["ssr"],
                    MTG_PA: mtg["pa"]})
    if dreambench is not None:
        row[DREAMBENCH_MH] = dreambench["mh_object"]
    return row


def dreambench_note(metrics: Mapping) -> str:
    """The lines under a DreamBench++ table: the all-category figure and the pooled one, told apart."""
    return (f"\nDB++ MH is the object category. All categories: {_fmt(metrics.get('mh_all_categories'), 3)} "
            "(the authors' aggregate, the Fisher-z mean of the four category values). Pooled over all prompts: "
            f"{_fmt(metrics.get('mh_pooled_prompts'), 3)} (one correlation per method across categories, a "
            "different quantity the authors call not meaningful; see docs/method.md, DreamBench++).\n")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def table1_markdown(rows: Mapping[str, Mapping], nearid_sources: Sequence[str] | None = None) -> str:
    """Table 1 as markdown: one row per scorer, columns `TABLE1_COLUMNS`.

    rows: scorer name -> dict with any of the `TABLE1_COLUMNS` keys (see `table1_row`); a key that
    is absent, None or NaN prints as an en dash. SSR/PA are percentages (2 decimals), MO/MH 3.
    nearid_sources: the distractor sources the NearID columns pool. Unless they are Table 1's 7
    settings, the NearID headers are marked and a note under the table names the sources, so a pool
    of other sources is never read as the paper's column.
    """
    marked = nearid_sources is not None and set(nearid_sources) != set(NEARID_TABLE1_SOURCES)
    header = ["scorer"] + [f"{h}\u2020" if marked and k in (NEARID_SSR, NEARID_PA) else h
                           for h, k, _ in TABLE1_COLUMNS]
    body = [[name] + [_fmt(m.get(k), d) for _, k, d in TABLE1_COLUMNS] for name, m in rows.items()]
    note = (f"\n\u2020 pooled over the distractor sources {', '.join(nearid_sources)}, not Table 1's 7 settings "
            f"({', '.join(NEARID_TABLE1_SOURCES)}).\n") if marked else ""
    return _markdown(header, body) + note


def mh_per_category(result: Mapping) -> str:
    """'all 0.4071, object 0.5450, style no samples, ...' from a `metrics.dreambench_mh` result.

    A category without samples (or with too few for a correlation) is said so instead of "nan".
    """
    parts = []
    for key, value in result.items():
        if not key.startswith("mh_"):
            continue
        category = key[3:]
        counts = [v for k, v in result.items() if k.endswith(f"/n_{category}")]  # one per method
        samples = sum(counts)
        if not math.isnan(value):
            parts.append(f"{category} {value:.4f}")
        elif not counts:  # an aggregate of the categories
            parts.append(f"{category} undefined")
        elif samples == 0:
            parts.append(f"{category} no samples")
        else:
            parts.append(f"{category} undefined ({samples} samples; a correlation needs 2 or more varying ones "
                         "per method)")
    return ", ".join(parts)


def _pool(scores: Sequence[Mapping]) -> dict:
    """Micro average of `nearid_scores` dicts: the same numbers as `nearid_pooled_scores`."""
    tot = {k: sum(s[k] for s in scores) for k in ("n_samples", "n_scored", "n_all_win", "n_terms",
                                                   "n_wins", "margin_count")}
    margin_sum = sum(s["margin_mean"] * s["margin_count"] for s in scores if s["margin_count"])
    return {"ssr": 100.0 * tot["n_all_win"] / tot["n_scored"] if tot["n_scored"] else float("nan"),
            "pa": 100.0 * tot["n_wins"] / tot["n_terms"] if tot["n_terms"] else float("nan"),
            "n_samples": tot["n_samples"], "n_terms": tot["n_terms"],
            "margin_mean": margin_sum / tot["margin_count"] if tot["margin_count"] else float("nan")}


def per_source_markdown(per_source: Mapping[str, Mapping]) -> str:
    """NearID scores per distractor source as markdown.

    per_source: source (lower-case dataset suffix, e.g. "flux_1024") -> `nearid_scores` dict.
    Rows: the Table-1 sources in `NEARID_TABLE1_SOURCES` order, other sources by name, then (when
    all 7 Table-1 sources are present) their pooled average, then FluxC sources ("fluxc*"), which
    the paper reports separately. Columns: SSR, PA (%), samples, terms, mean margin.
    """
    fluxc = sorted(s for s in per_source if s.startswith("fluxc"))
    main = [s for s in NEARID_TABLE1_SOURCES if s in per_source]
    main += sorted(s for s in per_source if s not in main and s not in fluxc)

    def line(name, s):
        return [name, _fmt(s["ssr"], 2), _fmt(s["pa"], 2), str(s["n_samples"]), str(s["n_terms"]),
                _fmt(s["margin_mean"], 4)]

    body = [line(s, per_source[s]) for s in main]
    if all(s in per_source for s in NEARID_TABLE1_SOURCES):
        pooled = _pool([per_source[s] for s in NEARID_TABLE1_SOURCES])
        body.append(line(f"**Table-1 average** (pooled, {len(NEARID_TABLE1_SOURCES)} sources)", pooled))
    body += [line(f"{s} (reported separately)", per_source[s]) for s in fluxc]
    return _markdown(["source", "SSR", "PA", "samples", "terms", "mean margin"], body)


# The near-identity retrieval table: (header, key of the metrics dict, decimals). Recall, mAP and the
# distractor-first rate (lower is better) are percentages; ARI and NMI are in [-0.5, 1] and [0, 1].
RETRIEVAL_COLUMNS = (
    ("R@1", "recall@1", 2),
    ("R@5", "recall@5", 2),
    ("R@10", "recall@10", 2),
    ("mAP", "map", 2),
    ("DFR (lower is better)", "distractor_first_rate", 2),
    ("ARI", "cluster_ari", 3),
    ("NMI", "cluster_nmi", 3),
)


def retrieval_markdown(rows: Mapping[str, Mapping]) -> str:
    """The near-identity retrieval table: one row per scorer (name -> `evaluate.py retrieval` metrics),
    columns `RETRIEVAL_COLUMNS`, then clusters found against identities. Its own table rather than
    Table 1's columns, which hold the paper's published benchmarks only."""
    header = ["scorer"] + [h for h, _, _ in RETRIEVAL_COLUMNS] + ["clusters / identities"]
    body = [[name] + [_fmt(m.get(k), d) for _, k, d in RETRIEVAL_COLUMNS]
            + [f"{m['n_clusters']} / {m['n_identities']}" if "n_clusters" in m else MISSING] for name, m in rows.items()]
    return _markdown(header, body)


# --------------------------------------------------------------------------------------------------
# Plots


def _new_figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def plot_margin_histograms(path, margins_by_source: Mapping[str, np.ndarray], model: str, bins: int = 40) -> Path:
    """Histogram of NearID margins per source, one panel each, on a shared x range.

    margins_by_source: source -> margins (any shape; NaN, i.e. absent terms, are dropped). A term
    wins when its margin is > 0 (right of the dashed line); each title gives the winning share.
    model: the scorer, named in the figure's title.
    """
    data = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in margins_by_source.items()}
    data = {k: v[np.isfinite(v)] for k, v in data.items()}
    if not data:
        raise ValueError("plot_margin_histograms needs at least one source")
    finite = np.concatenate(list(data.values()))
    lo, hi = (min(finite.min(), 0.0), max(finite.max(), 0.0)) if finite.size else (-1.0, 1.0)
    step = (hi - lo or 1.0) / bins
    edges = step * np.arange(math.floor(lo / step) - 1, math.ceil(hi / step) + 2)  # 0 is an edge
    ncols = min(4, len(data))
    nrows = math.ceil(len(data) / ncols)
    fig = _new_figure(3.6 * ncols, 2.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for ax, (name, m) in zip(axes.flat, data.items()):
        summary = f"{100 * (m > 0).mean():.1f}% of {m.size} terms win" if m.size else "no terms"
        ax.hist(m[m > 0], bins=edges, color="tab:green", label="win (> 0)")
        ax.hist(m[m <= 0], bins=edges, color="tab:red", label="loss (\u2264 0)")
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{name}\n{summary}", fontsize=10)
        ax.set_xlabel("margin = sim(views) \u2212 sim(view, distractor)", fontsize=8)
        ax.set_ylabel("terms", fontsize=9)
        ax.tick_params(labelsize=8, labelbottom=True)
    for ax in list(axes.flat)[len(data):]:
        ax.set_visible(False)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside upper right", fontsize=8)
    fig.suptitle(f"NearID margins per distractor source\n{model}", fontsize=12)
    return _save_png(fig, path)


def plot_ssr_pa(path, per_source: Mapping[str, Mapping], model: str) -> Path:
    """Grouped bars of SSR and PA (%) per source, each bar labelled with its value.

    per_source: source -> dict with "ssr" and "pa" (e.g. `nearid_scores`); order is kept.
    """
    if not per_source:
        raise ValueError("plot_ssr_pa needs at least one source")
    names = list(per_source)
    x = np.arange(len(names))
    width = 0.38
    fig = _new_figure(max(5.0, 1.1 * len(names) + 1.5), 4.2)
    ax = fig.subplots()
    for offset, key, label, color in ((-width / 2, "ssr", "SSR", "tab:blue"),
                                      (width / 2, "pa", "PA", "tab:orange")):
        values = [float(per_source[n][key]) for n in names]
        bars = ax.bar(x + offset, values, width, label=label, color=color)
        ax.bar_label(bars, labels=[_fmt(v, 1) for v in values], fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0, 112)
    ax.set_ylabel("%")
    ax.set_title(f"NearID SSR and PA per distractor source\n{model}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, path)


def plot_retrieval(path, scores: Mapping, model: str) -> Path:
    """Bars of the near-identity retrieval metrics (%): recall@k, mAP, and the distractor-first rate."""
    names = [(h, k) for h, k, _ in RETRIEVAL_COLUMNS if not k.startswith("cluster_")]
    values = [float(scores[k]) for _, k in names]
    fig = _new_figure(6.5, 4.2)
    ax = fig.subplots()
    colors = ["tab:red" if k == "distractor_first_rate" else "tab:blue" for _, k in names]
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.bar_label(bars, labels=[_fmt(v, 1) for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), [h for h, _ in names], fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("%")
    ax.set_title(f"Near-identity retrieval, {scores['n_queries']} queries, {scores['n_gallery']} gallery images\n"
                 f"clustering at {scores['cluster_threshold']:.3f}: ARI {scores['cluster_ari']:.3f}, NMI "
                 f"{scores['cluster_nmi']:.3f}\n{model}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, path)


def plot_score_distributions(path, records: Sequence[Mapping], model: str) -> Path:
    """Per method, the distribution of generated images' `score_mean` (violin, median bar) with each subject's
    mean as a labelled dot: how methods compare, and how much subjects differ within a method."""
    return _save_png(score_distribution_figure(records, model), path)


def score_distribution_figure(records: Sequence[Mapping], model: str, labelled_subjects: int = 8):
    """The figure of `plot_score_distributions`. Each violin is drawn whole (the y-axis spans every violin,
    and a method with fewer than 2 distinct scores gets dots only); subject dots are named when a method has
    at most `labelled_subjects` subjects; the legend sits below the axes, never over the data."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    if not methods:
        raise ValueError("plot_score_distributions needs at least one scored image")
    fig = _new_figure(max(5.5, 1.6 * len(methods) + 2), 5.0)
    ax = fig.subplots()
    values = [np.array([r["score_mean"] for r in records if r["method"] == m], dtype=float) for m in methods]
    spread = [x for x, v in enumerate(values) if len(np.unique(v)) > 1]  # a KDE needs 2 distinct values
    bodies = []
    if spread:
        bodies = ax.violinplot([values[x] for x in spread], positions=spread, showmedians=True,
                               showextrema=False)["bodies"]
        bodies[0].set_label("distribution of the images' scores (bar: median)")
    for x, method in enumerate(methods):
        subjects = sorted({r["subject"] for r in records if r["method"] == method})
        means = [np.mean([r["score_mean"] for r in records if r["method"] == method and r["subject"] == s])
                 for s in subjects]
        xs = np.full(len(means), x) + (np.linspace(-0.12, 0.12, len(means)) if len(means) > 1 else 0.0)
        ax.scatter(xs, means, s=16, color="black", zorder=3, label="mean of one subject's images" if x == 0 else None)
        if len(subjects) <= labelled_subjects:
            for dot_x, mean, subject in zip(xs, means, subjects):
                ax.annotate(subject, (dot_x, mean), xytext=(4, 0), textcoords="offset points", fontsize=6,
                            va="center", zorder=4)
    ax.set_ylim(_score_limits(bodies, min(v.min() for v in values), max(v.max() for v in values)))
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_xticks(range(len(methods)), [f"{m}\n({len(v)} image{'s' if len(v) != 1 else ''})"
                                        for m, v in zip(methods, values)],
                  rotation=30 if len(methods) > 3 else 0, ha="right" if len(methods) > 3 else "center")
    ax.set_ylabel("identity score (cosine, mean over references)")
    ax.set_title(f"Score distribution per method\n{model}", fontsize=10)
    fig.legend(loc="outside lower center", fontsize=8, ncols=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _score_limits(bodies, low: float, high: float) -> tuple:
    """y-limits that hold every violin body (in data coordinates) and every score from `low` to `high`."""
    for body in bodies:
        for path in body.get_paths():
            if len(path.vertices):
                low, high = min(low, path.vertices[:, 1].min()), max(high, path.vertices[:, 1].max())
    pad = max(0.05 * (high - low), 0.02)
    return low - pad, high + pad


def plot_training_loss(path, history: Mapping, model: str) -> Path:
    """The logged training loss by step, and the validation SSR/PA on a second axis when there are any."""
    losses = history.get("loss", [])
    if not losses:
        raise ValueError("no training loss was logged")
    fig = _new_figure(7, 4)
    ax = fig.subplots()
    steps, values = zip(*losses)
    ax.plot(steps, values, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (Tier 1 + alpha Tier 2)")
    ax.grid(alpha=0.3)
    # A validation of FluxC sources alone has no pooled score (FluxC enters no pool).
    validation = [v for v in history.get("validation", []) if v.get("split") == "val" and v.get("pooled")]
    if validation:
        right = ax.twinx()
        right.plot([v["step"] for v in validation], [v["pooled"]["ssr"] for v in validation], "o-",
                   color="tab:green", label="val SSR")
        right.plot([v["step"] for v in validation], [v["pooled"]["pa"] for v in validation], "s-",
                   color="tab:orange", label="val PA")
        right.set_ylabel("%")
        right.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Training the NearID head\nbase model {model}", fontsize=10)
    return _save_png(fig, path)


def plot_image_grid(path, rows: Sequence[Sequence[tuple]], title: str, cell_inches: float = 1.5) -> Path:
    """A contact sheet: rows of cells `(image, caption)`, an image an [H, W, 3] uint8 array, or None for
    one that could not be read (drawn as an empty grey cell). `title` says what is shown and the model."""
    if not rows or not any(rows):
        raise ValueError("plot_image_grid needs at least one image")
    ncols = max(len(cells) for cells in rows)
    caption_lines = max(caption.count("\n") + 1 for cells in rows for _, caption in cells) + 1  # + "(unreadable)"
    fig = _new_figure(cell_inches * ncols, (cell_inches + 0.13 * caption_lines + 0.1) * len(rows) + 0.6)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax_row, cells in zip(axes, rows):
        for ax, (image, caption) in zip(ax_row, cells):
            ax.imshow(image if image is not None else np.full((8, 8, 3), 220, np.uint8))
            ax.set_title(caption if image is not None else f"{caption}\n(unreadable)", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save_png(fig, path)


# --------------------------------------------------------------------------------------------------
# MTG


def mtg_markdown(scorer_spec: str, scores: Mapping, correlations: Sequence) -> str:
    """Table-1 row of the MTG columns, then the 4 correlations behind MO."""
    lines = ["| similarity | oracle | Pearson r |", "|---|---|---|"]
    lines += [f"| {name} | oracle{view} | {scores[f'r_{name}_oracle{view}']:.4f} |" for name, view in correlations]
    return (table1_markdown({scorer_spec: table1_row(mtg=scores)}) + "\n"
            + "\n".join(lines) + f"\n\n{scores['n_rows']} of {scores['n_rows_dataset']} rows scored.\n")


def plot_mtg_similarity_vs_oracle(path, sims: Mapping, oracles: np.ndarray, scores: Mapping, model: str,
                                  similarities: Sequence, correlations: Sequence) -> Path:
    """2x2 scatter of each similarity behind MO against its oracle (scored rows), r in the titles."""
    fig = _new_figure(8, 7)
    images = {name: (a, b) for name, a, b in similarities}
    for ax, (name, view) in zip(fig.subplots(2, 2).flat, correlations):
        ax.scatter(oracles[:, view - 1], sims[name], s=14, alpha=0.7)
        ax.set_title(f"{name} vs oracle{view}: r = {scores[f'r_{name}_oracle{view}']:.3f}", fontsize=10)
        ax.set_xlabel(f"oracle{view}: share of object {view} left unchanged", fontsize=8)
        ax.set_ylabel(f"{name} = cos({images[name][0]}, {images[name][1]})", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"MTG: similarity vs oracle, {scores['n_rows']} rows "
                 f"(MO {scores['mo']:.3f}, MOpair {scores['mo_pair']:.3f})\n{model}", fontsize=11)
    return _save_png(fig, path)


# --------------------------------------------------------------------------------------------------
# The files of one run


class RunOutputs:
    """The files one run writes into a folder, so that the folder never mixes two runs unnoticed.

    On creation, the previous run's results file of the same name is removed first (it vouches for
    the files beside it), then every file it listed, so no stale output survives a rerun (say, a
    method no longer evaluated). Files are written atomically. Optional steps (plots, a model-card
    update) that fail become warnings instead of failing the run: the metrics are never lost. The
    results JSON, written last by `finish`, lists every file the run wrote and every warning; its
    presence means the run finished.
    """

    def __init__(self, folder, results_name: str, *, always: Sequence[str] = (), keep_previous: bool = False):
        """always: files or folders the run writes whatever happens (a training run's checkpoints):
        removed too, even when no results file lists them (the previous run stopped before its end).
        keep_previous: leave the previous run's outputs (a resumed run continues them)."""
        self.folder, self.results_name = require_folder(folder), results_name
        self.files, self.warnings = [], []
        if keep_previous:
            return
        previous = self.folder / results_name
        listed = []
        if previous.is_file():
            try:
                listed = json.loads(previous.read_text(encoding="utf-8")).get("files", [])
            except (ValueError, AttributeError):
                listed = []
            previous.unlink()
        for name in listed:
            path = (self.folder / name).resolve()
            if path.is_relative_to(self.folder.resolve()) and path.is_file():
                path.unlink()
        for name in always:
            path = self.folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        """Where output `name` goes, recorded as one of this run's files."""
        self.files.append(name)
        return self.folder / name

    def optional(self, what: str, step, *args) -> bool:
        """Run `step(*args)`; on any failure record and print a warning naming `what`, and go on."""
        try:
            step(*args)
            return True
        except Exception as error:  # a plot or card failure must not cost the computed results
            self.warn(f"{what} failed ({type(error).__name__}: {error}); the results are written without it")
            return False

    def warn(self, warning: str) -> None:
        """Print `warning` and record it in the results JSON."""
        self.warnings.append(warning)
        print(f"warning: {warning}", file=sys.stderr)

    def finish(self, document: dict) -> Path:
        """Write the results JSON last, with this run's files and warnings."""
        document = {**document, "files": list(dict.fromkeys(self.files)), "warnings": list(self.warnings)}
        return atomic_write_json(self.folder / self.results_name, document)
