"""Evaluation metrics of NearID as pure functions (docs/method.md sections 4 and 6).

Arrays in (numpy, or torch tensors on any device), flat dicts with stable keys out. Percentages are
in [0, 100]. No model, dataset or plotting code lives here, so `evaluate.py` and the tests import it
without pulling in anything heavy.

- NearID benchmark: `nearid_margins`, `nearid_margins_from_sims`, `nearid_scores`,
  `nearid_pooled_scores`.
- MTG (part-level): `mtg_oracle`, `mtg_scores`.
- Correlations: `pearson`, `fisher_z_mean`.
- DreamBench++ metric-to-human (MH): `canonical_dreambench_key`, `canonicalize_dreambench_scores`,
  `metric_to_human`, `human_agreement`, `dreambench_mh`, `dreambench_human_ceiling`. The rating
  files are read by `nearid.data.dreambench_files` (`load_dreambench_scores`, `load_dreambench_human`).
- Near-identity retrieval: `retrieval_per_query`, `retrieval_scores`, `clustering_scores`.
"""

import re
from pathlib import PurePosixPath
from typing import Mapping, Sequence

import numpy as np

# The 6 NearID terms of a sample, as (i, j, anchor): view pair i<j, anchor a in {i, j}. Columns of
# the margin arrays follow this order.
NEARID_TERMS = ((0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 2), (1, 2, 1), (1, 2, 2))
# Distractor sources averaged (pooled) in Table 1; `fluxc` is reported separately.
NEARID_TABLE1_SOURCES = ("flux", "flux_1024", "powerpaint", "sdxl", "sdxl_1024", "qwen", "qwen_1328")
# Their published datasets on the Hub.
NEARID_TABLE1_HUB_SOURCES = {
    "flux": "Aleksandar/NearID-Flux", "flux_1024": "Aleksandar/NearID-Flux_1024",
    "powerpaint": "Aleksandar/NearID-PowerPaint", "sdxl": "Aleksandar/NearID-SDXL",
    "sdxl_1024": "Aleksandar/NearID-SDXL_1024", "qwen": "Aleksandar/NearID-Qwen", "qwen_1328": "Aleksandar/NearID-Qwen_1328",
}


def _np(x, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------
# NearID benchmark (SSR, PA)


def nearid_margins_from_sims(view_sims, cross_sims, view_mask, distractor_mask):
    """Per-term margins `m = sim_ij - cross_aa` of the NearID benchmark.

    Args:
        view_sims: [N, 3, 3] cosine similarities between views img1..3 of each sample (only i<j
            is read).
        cross_sims: [N, 3] `cross_aa = cos(img_a, nimg_a)`, view a against the distractor
            inpainted into its own scene.
        view_mask, distractor_mask: [N, 3] bool, which of img1..3 / nimg1..3 are present. Slots
            keep their position: a missing img2 leaves img3 in slot 3 and nimg3 still pairs with
            it (compacting slots pairs a view with another scene's distractor).

    Returns:
        margins: [N, 6] float64 in `NEARID_TERMS` order, NaN where the term does not exist.
        valid: [N, 6] bool, term exists: views i and j present and distractor of anchor a present.
        3 views and 3 distractors give 6 terms, 2 views 2 terms.
    """
    view_sims, cross_sims = _np(view_sims), _np(cross_sims)
    view_mask, distractor_mask = _np(view_mask, bool), _np(distractor_mask, bool)
    n = view_sims.shape[0]
    if view_sims.shape != (n, 3, 3) or cross_sims.shape != (n, 3):
        raise ValueError(f"expected view_sims [N,3,3] and cross_sims [N,3], got "
                         f"{view_sims.shape} and {cross_sims.shape}")
    if view_mask.shape != (n, 3) or distractor_mask.shape != (n, 3):
        raise ValueError(f"expected view_mask and distractor_mask [N,3] with N={n}, got "
                         f"{view_mask.shape} and {distractor_mask.shape}")
    i, j, a = (np.array(c) for c in zip(*NEARID_TERMS))
    valid = view_mask[:, i] & view_mask[:, j] & distractor_mask[:, a]
    margins = view_sims[:, i, j] - cross_sims[:, a]
    if not np.isfinite(margins[valid]).all():
        bad = int(np.argwhere(valid & ~np.isfinite(margins))[0, 0])
        raise ValueError(f"non-finite similarity for a present slot in sample {bad}; check the "
                         "embeddings and the presence masks")
    return np.where(valid, margins, np.nan), valid


def nearid_margins(view_emb, distractor_emb, view_mask, distractor_mask):
    """`nearid_margins_from_sims` from embeddings.

    Args:
        view_emb: [N, 3, D] embeddings of img1..3; distractor_emb: [N, 3, D] of nimg1..3 (one
            distractor source). Rows are L2-normalised here; absent slots may hold anything
            (zeros, say) and are ignored through the masks.
        view_mask, distractor_mask: [N, 3] bool presence masks.

    Returns:
        (margins [N, 6], valid [N, 6]) as in `nearid_margins_from_sims`.
    """
    v, d = _normalize(_np(view_emb)), _normalize(_np(distractor_emb))
    if v.ndim != 3 or v.shape[1] != 3 or d.shape != v.shape:
        raise ValueError(f"expected view_emb and distractor_emb [N,3,D] of equal shape, got "
                         f"{v.shape} and {d.shape}")
    view_sims = np.einsum("nid,njd->nij", v, v)
    cross_sims = np.einsum("nad,nad->na", v, d)
    return nearid_margins_from_sims(view_sims, cross_sims, view_mask, distractor_mask)


def nearid_scores(margins, valid, *, pa_counts_mean_margin: bool = False) -> dict:
    """SSR and PA of the NearID benchmark, with margin statistics.

    Args:
        margins, valid: [N, T] from `nearid_margins` (T = 6).
        pa_counts_mean_margin: reproduce the reference table code's quirk: it also counted each
            sample's "mean margin > 0" as one more trial in PA (a 7th trial for a 3-view sample).
            Differences are ~0.1 points. Off by default: PA is pooled wins / pooled terms.

    Returns:
        ssr: % of scored samples whose terms all win (win = margin > 0); samples with no term are
            left out of the denominator and counted in `n_unscored`.
        pa: % pooled wins / pooled terms.
        n_samples, n_scored, n_unscored, n_all_win, n_terms, n_wins.
        margin_mean, margin_median, margin_min, margin_p5 (5th percentile, linear interpolation),
        margin_count: over all pooled terms. NaN where nothing was scored.
    """
    margins, valid = _np(margins), _np(valid, bool)
    if margins.shape != valid.shape or margins.ndim != 2:
        raise ValueError(f"expected margins and valid [N,T] of equal shape, got {margins.shape} "
                         f"and {valid.shape}")
    terms = valid.sum(1)
    wins = valid & (np.where(valid, margins, 0.0) > 0)
    scored = terms > 0
    all_win = scored & (wins.sum(1) == terms)
    n_terms, n_wins = int(terms.sum()), int(wins.sum())
    if pa_counts_mean_margin and scored.any():
        mean_margin = np.where(valid, margins, 0.0).sum(1)[scored] / terms[scored]
        n_terms, n_wins = n_terms + int(scored.sum()), n_wins + int((mean_margin > 0).sum())
    pooled = margins[valid]
    empty = pooled.size == 0
    return {
        "ssr": float("nan") if empty else 100.0 * all_win.sum() / scored.sum(),
        "pa": float("nan") if empty else 100.0 * n_wins / n_terms,
        "n_samples": int(margins.shape[0]),
        "n_scored": int(scored.sum()),
        "n_unscored": int((~scored).sum()),
        "n_all_win": int(all_win.sum()),
        "n_terms": n_terms,
        "n_wins": n_wins,
        "margin_mean": float("nan") if empty else float(pooled.mean()),
        "margin_median": float("nan") if empty else float(np.median(pooled)),
        "margin_min": float("nan") if empty else float(pooled.min()),
        "margin_p5": float("nan") if empty else float(np.percentile(pooled, 5)),
        "margin_count": int(pooled.size),
    }


def nearid_pooled_scores(per_source: Mapping[str, tuple], sources: Sequence[str] = NEARID_TABLE1_SOURCES,
                         **kwargs) -> dict:
    """Micro average over distractor sources (Table 1's NearID average over its 7 settings).

    Args:
        per_source: source name (lower-case dataset suffix, e.g. "flux_1024") -> (margins [N_s, T],
            valid [N_s, T]). Sources not in `sources` are ignored.
        sources: which sources to pool; each must be present.
        **kwargs: passed to `nearid_scores`.

    Returns:
        `nearid_scores` of the concatenated samples (each (sample, source) pair counts once in SSR,
        each term once in PA), plus `n_sources`.
    """
    missing = [s for s in sources if s not in per_source]
    if missing:
        raise ValueError(f"pooling needs every source of {list(sources)}; missing {missing}, "
                         f"have {sorted(per_source)}. Evaluate those sources or pass `sources=`.")
    margins = np.concatenate([_np(per_source[s][0]) for s in sources])
    valid = np.concatenate([_np(per_source[s][1], bool) for s in sources])
    return {**nearid_scores(margins, valid, **kwargs), "n_sources": len(sources)}


# --------------------------------------------------------------------------------------------------
# Correlations


def pearson(x, y) -> float:
    """Pearson r of two [N] vectors (N >= 2, finite).

    Raises ValueError when r is undefined (a constant vector), instead of returning NaN.
    """
    x, y = _np(x).ravel(), _np(y).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"pearson needs two vectors of equal length >= 2, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("pearson got non-finite values")
    for name, v in (("x", x), ("y", y)):
        if np.ptp(v) == 0:
            raise ValueError(f"Pearson r is undefined: {name} is constant ({v[0]!r} x {v.size})")
    xc, yc = x - x.mean(), y - y.mean()
    return float(np.clip(xc @ yc / np.sqrt((xc @ xc) * (yc @ yc)), -1.0, 1.0))


def fisher_z_mean(rs) -> float:
    """Mean of correlations in Fisher-z space: tanh(mean(atanh(r))). rs: [K], each in [-1, 1].

    An r of exactly +-1 maps to +-inf, so the mean is +-1 (NaN if both signs occur).
    """
    rs = _np(rs).ravel()
    if rs.size == 0 or not np.isfinite(rs).all() or (np.abs(rs) > 1).any():
        raise ValueError(f"fisher_z_mean needs finite correlations in [-1, 1], got {rs.tolist()}")
    with np.errstate(divide="ignore"):
        return float(np.tanh(np.arctanh(rs).mean()))


# --------------------------------------------------------------------------------------------------
# MTG (part-level)

# The MTG dataset's image columns: both images of a pair, then their inpainted versions, object masks, part masks.
MTG_COLUMNS = tuple(f"image_{v}_{kind}" for kind in ("original", "inpainted", "object_mask", "part_mask")
                    for v in (1, 2))


def mtg_oracle(object_mask, part_mask) -> float:
    """oracle = 1 - |part_mask > 0| / |object_mask > 0|: the share of the object left unchanged.

    Masks: arrays (or PIL images) of equal shape, e.g. [H, W]; any value > 0 is foreground.
    """
    obj, part = np.asarray(object_mask), np.asarray(part_mask)
    if obj.shape != part.shape:
        raise ValueError(f"object and part masks must have the same shape, got {obj.shape} and "
                         f"{part.shape}; resize the part mask to the object mask first")
    n_obj = int((obj > 0).sum())
    if n_obj == 0:
        raise ValueError("object mask is empty: the MTG oracle is undefined for this row")
    return 1.0 - int((part > 0).sum()) / n_obj


def mtg_scores(s12, s11p, s22p, s12p, s21p, oracle1, oracle2) -> dict:
    """MTG metrics from per-row similarities (all [N]).

    s12 = (o1, o2), s11p = (o1, i1), s22p = (o2, i2), s12p = (o1, i2), s21p = (o2, i1), where o is
    an original view and i its part-inpainted version; oracle_k from `mtg_oracle`.

    Returns:
        mo: Fisher-z mean of the 4 Pearson r below; mo_pair: of the 2 same-image ones.
        r_s11p_oracle1, r_s22p_oracle2, r_s12p_oracle2, r_s21p_oracle1.
        ssr: % rows with both margins s12 - s11p and s12 - s22p > 0; pa: % of the 2N margins > 0.
        n_rows. Raises ValueError if a correlation is undefined (constant input).
    """
    s12, s11p, s22p, s12p, s21p, o1, o2 = (_np(v).ravel() for v in
                                           (s12, s11p, s22p, s12p, s21p, oracle1, oracle2))
    r = {
        "r_s11p_oracle1": pearson(s11p, o1),
        "r_s22p_oracle2": pearson(s22p, o2),
        "r_s12p_oracle2": pearson(s12p, o2),
        "r_s21p_oracle1": pearson(s21p, o1),
    }
    wins = np.stack([s12 - s11p > 0, s12 - s22p > 0], 1)
    return {
        "mo": fisher_z_mean(list(r.values())),
        "mo_pair": fisher_z_mean([r["r_s11p_oracle1"], r["r_s22p_oracle2"]]),
        **r,
        "ssr": 100.0 * wins.all(1).mean(),
        "pa": 100.0 * wins.mean(),
        "n_rows": int(s12.size),
    }


# --------------------------------------------------------------------------------------------------
# DreamBench++ metric-to-human agreement (MH)

DREAMBENCH_METHODS = ("textual_inversion_sd", "dreambooth_sd", "dreambooth_lora_sdxl", "blip_diffusion",
                      "emu2", "ip_adapter_plus_vit_h_sdxl", "ip_adapter_vit_g_sdxl")
DREAMBENCH_CATEGORIES = ("object", "style", "live_subject_animal", "live_subject_human")
# Subject names that differ between files for the same images (emu2 metric files vs human files).
DREAMBENCH_SUBJECT_ALIASES = {"rubik's_cube": "magic_cube"}
# The bucket of every prompt of a method at once: one correlation pooled over all categories. The
# authors call it not meaningful (categories differ in score range); their all-category figure is
# `mh_all_categories`, the Fisher-z mean of the four category values.
DREAMBENCH_POOLED = "pooled_prompts"
_DB_KEY = re.compile(r"^(object|style|live_subject_animal|live_subject_human)_(\d+)_(.+)-(\d+)(?:_(\d+))?$")


def dreambench_key(relpath: str) -> str:
    """Score key of a generated image: its relative path without extension, `/` -> `-`."""
    return str(PurePosixPath(relpath).with_suffix("")).replace("/", "-")


def canonical_dreambench_key(key: str) -> str:
    """`<category>_<NN>_<subject>-<prompt>[_<sample>]` -> `<category>_<NN>_<subject>-<prompt>`.

    Drops the `_<sample>` suffix and maps `DREAMBENCH_SUBJECT_ALIASES`. Raises ValueError on a key
    of another form.
    """
    canonical = _canonical_key(key)
    if canonical is None:
        raise ValueError(f"not a DreamBench++ key: {key!r}")
    return canonical


def _canonical_key(key: str) -> str | None:
    """`canonical_dreambench_key`, None for a key of another form."""
    m = _DB_KEY.match(key)
    if m is None:
        return None
    category, idx, subject, prompt, _ = m.groups()
    return f"{category}_{idx}_{DREAMBENCH_SUBJECT_ALIASES.get(subject, subject)}-{prompt}"


def canonicalize_dreambench_scores(scores: Mapping[str, float], source: str = "scores") -> dict:
    """Canonical keys (see `canonical_dreambench_key`) -> float, in input order.

    Raises ValueError naming `source` and the first offending keys if a key does not parse, two keys
    collapse to one (e.g. several samples per prompt), or a value is not finite.
    """
    canonical = [_canonical_key(k) for k in scores]  # one match of each key
    bad = [k for k, c in zip(scores, canonical) if c is None]
    if bad:
        raise ValueError(f"{source}: {len(bad)} key(s) are not DreamBench++ keys "
                         f"'<category>_<NN>_<subject>-<prompt>[_<sample>]' with category in "
                         f"{DREAMBENCH_CATEGORIES}; first: {bad[:3]}")
    out, first_seen = {}, {}
    for (k, v), c in zip(scores.items(), canonical):
        if c in out:
            raise ValueError(f"{source}: keys {first_seen[c]!r} and {k!r} both align to {c!r}; "
                             "keep one score per (subject, prompt)")
        out[c], first_seen[c] = float(v), k
    nonfinite = [k for k, v in out.items() if not np.isfinite(v)]
    if nonfinite:
        raise ValueError(f"{source}: non-finite scores, first: {nonfinite[:3]}")
    return out


def _check_same_keys(ref: Mapping, other: Mapping, ref_name: str, other_name: str) -> None:
    missing = [k for k in ref if k not in other]
    extra = [k for k in other if k not in ref]
    if missing or extra:
        raise ValueError(f"{other_name} does not cover the keys of {ref_name}: {len(missing)} missing "
                         f"(first: {missing[:3]}), {len(extra)} unexpected (first: {extra[:3]})")


def _by_category(keys: Sequence[str]) -> dict:
    cats = {DREAMBENCH_POOLED: list(keys)}
    for c in DREAMBENCH_CATEGORIES:
        cats[c] = [k for k in keys if _DB_KEY.match(k).group(1) == c]
    return cats


def metric_to_human(scores: Mapping[str, float], human_g1: Mapping[str, float],
                    human_g2: Mapping[str, float], *, name: str = "scores") -> dict:
    """MH of one scorer on one method: mean of Pearson(scores, group 1) and Pearson(scores, group 2).

    Keys are aligned with `canonicalize_dreambench_scores`; the three key sets must match exactly
    (ValueError naming `name` and the first offending keys otherwise).

    Returns, for c in DREAMBENCH_CATEGORIES and "pooled_prompts" (every prompt in one correlation):
    `mh_<c>`, `r_group1_<c>`, `r_group2_<c>`, `n_<c>` (NaN correlations for a category with fewer
    than 2 keys); and `mh_all_categories`, the Fisher-z mean of the four category `mh_<c>`.
    """
    s = canonicalize_dreambench_scores(scores, f"{name} (metric scores)")
    g1 = canonicalize_dreambench_scores(human_g1, f"{name} (human group 1)")
    g2 = canonicalize_dreambench_scores(human_g2, f"{name} (human group 2)")
    _check_same_keys(g1, g2, f"{name} human group 1", f"{name} human group 2")
    _check_same_keys(g1, s, f"{name} human ratings", f"{name} metric scores")
    out = {}
    for c, keys in _by_category(list(g1)).items():
        r1 = pearson([s[k] for k in keys], [g1[k] for k in keys]) if len(keys) > 1 else float("nan")
        r2 = pearson([s[k] for k in keys], [g2[k] for k in keys]) if len(keys) > 1 else float("nan")
        out.update({f"mh_{c}": (r1 + r2) / 2, f"r_group1_{c}": r1, f"r_group2_{c}": r2,
                    f"n_{c}": len(keys)})
    return {**out, "mh_all_categories": _all_categories(out)}


def _all_categories(values: Mapping) -> float:
    """The authors' all-category MH: Fisher-z mean of the four `mh_<category>` (NaN if one is NaN)."""
    rs = [values[f"mh_{c}"] for c in DREAMBENCH_CATEGORIES]
    return float("nan") if np.isnan(rs).any() else fisher_z_mean(rs)


def human_agreement(human_g1: Mapping[str, float], human_g2: Mapping[str, float], *,
                    name: str = "human") -> dict:
    """The human ceiling of one method: `mh_<c>` = Pearson(group 1, group 2), `n_<c>`, and
    `mh_all_categories` (keys as in `metric_to_human`)."""
    g1 = canonicalize_dreambench_scores(human_g1, f"{name} (human group 1)")
    g2 = canonicalize_dreambench_scores(human_g2, f"{name} (human group 2)")
    _check_same_keys(g1, g2, f"{name} human group 1", f"{name} human group 2")
    out = {}
    for c, keys in _by_category(list(g1)).items():
        r = pearson([g1[k] for k in keys], [g2[k] for k in keys]) if len(keys) > 1 else float("nan")
        out.update({f"mh_{c}": r, f"n_{c}": len(keys)})
    return {**out, "mh_all_categories": _all_categories(out)}


def _aggregate(per_method: Mapping[str, dict]) -> dict:
    out = {}
    for c in DREAMBENCH_CATEGORIES + (DREAMBENCH_POOLED,):
        rs = [d[f"mh_{c}"] for d in per_method.values()]
        out[f"mh_{c}"] = float("nan") if np.isnan(rs).any() else fisher_z_mean(rs)
    out["mh_all_categories"] = _all_categories(out)
    for m, d in per_method.items():
        out.update({f"{m}/{k}": v for k, v in d.items()})
    return out


def dreambench_mh(scores_by_method: Mapping[str, Mapping[str, float]],
                  human_by_method: Mapping[str, tuple], methods: Sequence[str] = DREAMBENCH_METHODS,
                  *, scorer: str = "scores") -> dict:
    """MH over methods: `mh_<c>` = Fisher-z mean over `methods` of each method's `mh_<c>`
    (`mh_object` is Table 1's DB++ column), plus every per-method value as `<method>/<key>`.

    `mh_all_categories` is the authors' all-category figure: the Fisher-z mean of the four category
    values `mh_object`, `mh_style`, `mh_live_subject_animal`, `mh_live_subject_human`.
    `mh_pooled_prompts` is a different quantity, one correlation per method over all prompts of
    all categories, which the authors call not meaningful (docs/method.md, DreamBench++).

    scores_by_method: method -> {key: score}; human_by_method: method -> (group1, group2);
    scorer: a name for error messages.
    """
    missing = [m for m in methods if m not in scores_by_method or m not in human_by_method]
    if missing:
        raise ValueError(f"no scores or human ratings for methods {missing}")
    return _aggregate({m: metric_to_human(scores_by_method[m], *human_by_method[m], name=f"{scorer}/{m}")
                       for m in methods})


def dreambench_human_ceiling(human_by_method: Mapping[str, tuple],
                             methods: Sequence[str] = DREAMBENCH_METHODS) -> dict:
    """Group 1 vs group 2 agreement, aggregated like `dreambench_mh` (the ceiling row)."""
    missing = [m for m in methods if m not in human_by_method]
    if missing:
        raise ValueError(f"no human ratings for methods {missing}")
    return _aggregate({m: human_agreement(*human_by_method[m], name=m) for m in methods})


# --------------------------------------------------------------------------------------------------
# Near-identity retrieval (docs/method.md section 6)

RETRIEVAL_KS = (1, 5, 10)


def retrieval_per_query(similarity, relevant, own_distractor) -> dict:
    """Where each query's relevant items land when the gallery is ranked by similarity.

    Args:
        similarity: [Q, M] cosine similarity of each query to each gallery item. An item a query must
            not see (the query itself) has -inf: it ranks last and must not be relevant.
        relevant: [Q, M] bool, the items of the query's identity (at least one per query).
        own_distractor: [Q, M] bool, the near-identity distractors of the query's own row.

    Ties keep gallery order (a stable sort), so the result does not depend on the platform.

    Returns:
        first_relevant_rank: [Q] int, 1-based rank of the best-ranked relevant item.
        average_precision: [Q] float, mean over relevant items of the precision at their rank.
        top1: [Q] int, gallery index of the top-ranked item; top1_score: [Q] its similarity.
        top1_own_distractor: [Q] bool, the top-ranked item is one of the query's own distractors.
    """
    similarity = _np(similarity)
    relevant, own_distractor = _np(relevant, bool), _np(own_distractor, bool)
    if similarity.ndim != 2 or relevant.shape != similarity.shape or own_distractor.shape != similarity.shape:
        raise ValueError(f"expected similarity, relevant and own_distractor [Q, M] of one shape, got "
                         f"{similarity.shape}, {relevant.shape} and {own_distractor.shape}")
    if np.isnan(similarity).any() or np.isposinf(similarity).any():
        raise ValueError("similarity holds NaN or +inf; only -inf (an excluded item) is allowed")
    if not relevant.any(1).all() or (relevant & np.isneginf(similarity)).any():
        bad = int(np.flatnonzero(~relevant.any(1) | (relevant & np.isneginf(similarity)).any(1))[0])
        raise ValueError(f"query {bad} has no relevant item, or an excluded (-inf) one; every query needs a "
                         "relevant item it can see")
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    ranks = np.arange(1, similarity.shape[1] + 1)
    precision = np.cumsum(hits, axis=1) / ranks
    top1 = order[:, 0]
    rows = np.arange(len(top1))
    return {"first_relevant_rank": hits.argmax(1) + 1,
            "average_precision": (precision * hits).sum(1) / hits.sum(1),
            "top1": top1, "top1_score": similarity[rows, top1],
            "top1_own_distractor": own_distractor[rows, top1]}


def retrieval_scores(first_relevant_rank, average_precision, top1_own_distractor, ks=RETRIEVAL_KS) -> dict:
    """Recall@k, mAP and the distractor-first rate (DFR) over queries, each in percent.

    Args: [Q] arrays from `retrieval_per_query` (several chunks of queries may be concatenated).

    Returns:
        recall@k: % of queries with a relevant item in the top k, for each k in `ks`.
        map: mean average precision (%). distractor_first_rate: % of queries whose top-ranked item is
        one of their own near-identity distractors (lower is better). n_queries. NaN without queries.
    """
    first = _np(first_relevant_rank)
    ap, own = _np(average_precision), _np(top1_own_distractor, bool)
    if not first.shape == ap.shape == own.shape or first.ndim != 1:
        raise ValueError(f"expected three [Q] arrays, got {first.shape}, {ap.shape} and {own.shape}")
    empty = first.size == 0
    scores = {f"recall@{k}": float("nan") if empty else 100.0 * float((first <= k).mean()) for k in ks}
    scores.update({"map": float("nan") if empty else 100.0 * float(ap.mean()),
                   "distractor_first_rate": float("nan") if empty else 100.0 * float(own.mean()),
                   "n_queries": int(first.size)})
    return scores


def clustering_scores(identities, clusters) -> dict:
    """Agreement of a clustering with the true identities: ARI and NMI (scikit-learn's definitions).

    Args: identities, clusters: [N] labels (any hashable values) of the same N items.

    Returns: ari (adjusted Rand index, 1 = identical partitions, ~0 = chance), nmi (normalised mutual
    information, arithmetic mean), n_clusters, n_identities, n_items.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    identities, clusters = np.asarray(identities), np.asarray(clusters)
    if identities.shape != clusters.shape or identities.ndim != 1 or identities.size == 0:
        raise ValueError(f"expected two [N] label arrays of one length N >= 1, got {identities.shape} and "
                         f"{clusters.shape}")
    return {"ari": float(adjusted_rand_score(identities, clusters)),
            "nmi": float(normalized_mutual_info_score(identities, clusters)),
            "n_clusters": int(len(np.unique(clusters))), "n_identities": int(len(np.unique(identities))),
            "n_items": int(identities.size)}
