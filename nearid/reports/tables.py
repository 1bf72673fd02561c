"""Markdown tables of NearID evaluations: Table 1 and its parts, per-source NearID scores, retrieval, MTG.

Everything here takes the flat metric dicts of `nearid.metrics` and formats them; nothing computes a
metric. A value that was not evaluated (absent, None or NaN) prints as an en dash (`MISSING`).
"""

import math
from typing import Mapping, Sequence

import numpy as np

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


def format_value(value, decimals: int) -> str:
    """`value` with `decimals` decimals, or `MISSING` for None and NaN (a value that was not evaluated)."""
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
    return (f"\nDB++ MH is the object category. All categories: {format_value(metrics.get('mh_all_categories'), 3)} "
            "(the authors' aggregate, the Fisher-z mean of the four category values). Pooled over all prompts: "
            f"{format_value(metrics.get('mh_pooled_prompts'), 3)} (one correlation per method across categories, a "
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
    body = [[name] + [format_value(m.get(k), d) for _, k, d in TABLE1_COLUMNS] for name, m in rows.items()]
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
        return [name, format_value(s["ssr"], 2), format_value(s["pa"], 2), str(s["n_samples"]), str(s["n_terms"]),
                format_value(s["margin_mean"], 4)]

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
    body = [[name] + [format_value(m.get(k), d) for _, k, d in RETRIEVAL_COLUMNS]
            + [f"{m['n_clusters']} / {m['n_identities']}" if "n_clusters" in m else MISSING]
            for name, m in rows.items()]
    return _markdown(header, body)


def mtg_markdown(scorer_spec: str, scores: Mapping, correlations: Sequence) -> str:
    """Table-1 row of the MTG columns, then the 4 correlations behind MO."""
    lines = ["| similarity | oracle | Pearson r |", "|---|---|---|"]
    lines += [f"| {name} | oracle{view} | {scores[f'r_{name}_oracle{view}']:.4f} |" for name, view in correlations]
    return (table1_markdown({scorer_spec: table1_row(mtg=scores)}) + "\n"
            + "\n".join(lines) + f"\n\n{scores['n_rows']} of {scores['n_rows_dataset']} rows scored.\n")
