"""DreamBench++ files: the samples layout and the rating files (docs/method.md section 4).

- `dreambench_methods` / `dreambench_pairs` (`dreambench_pairs_and_others`) read the samples layout
  `<root>/<method>/{src_image,tgt_image}/<relative path>`.
- `load_dreambench_scores` / `load_dreambench_human` read published per-image scores and human
  ratings; `dreambench_mh_from_files` correlates the two (`nearid.metrics.dreambench_mh`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nearid.cli import lazy_module
from nearid.io import parse_json
from nearid.metrics import DREAMBENCH_METHODS, canonicalize_dreambench_scores, dreambench_key, dreambench_mh

# Loaded when a samples folder is walked: reading published score files needs no image decode (transformers).
images = lazy_module("nearid.images")

# --------------------------------------------------------------------------------------------------
# Samples layout


def dreambench_methods(samples_root) -> list:
    """Sorted method folders under `samples_root` that hold a `tgt_image` folder."""
    root = Path(samples_root)
    if not root.is_dir():
        raise FileNotFoundError(f"DreamBench++ samples folder {root} does not exist; expected "
                                "<root>/<method>/{src_image,tgt_image}/...")
    methods = sorted(p.name for p in root.iterdir() if (p / "tgt_image").is_dir())
    if not methods:
        raise FileNotFoundError(f"no method folder with a tgt_image folder under {root}; found "
                                f"{sorted(p.name for p in root.iterdir())[:10]}")
    return methods


def dreambench_pairs(samples_root, method: str) -> list:
    """`[(key, reference path, generated path)]` of every generated image of `method`, sorted by key.

    Each `<root>/<method>/tgt_image/<rel>` pairs with `<root>/<method>/src_image/<rel>`; the key is
    `metrics.dreambench_key(<rel>)`.
    """
    return dreambench_pairs_and_others(samples_root, method)[0]


def dreambench_pairs_and_others(samples_root, method: str) -> tuple:
    """(`dreambench_pairs`, `[(file, reason)]` of the files under `tgt_image` that are not images), from
    one walk of the folder."""
    base = Path(samples_root) / method
    tgt_root, src_root = base / "tgt_image", base / "src_image"
    if not tgt_root.is_dir():
        raise FileNotFoundError(f"no generated images folder {tgt_root}; methods with one: "
                                f"{dreambench_methods(samples_root)}")
    pairs = {}
    generated, others = images.find_images(tgt_root)
    for tgt in generated:
        rel = tgt.relative_to(tgt_root).as_posix()
        src = src_root / rel
        if not src.is_file():
            raise FileNotFoundError(f"generated image {tgt} has no reference image at {src}")
        key = dreambench_key(rel)
        if key in pairs:
            raise ValueError(f"{tgt} and {pairs[key][2]} have the same key {key!r}; keep one of them")
        pairs[key] = (key, src, tgt)
    if not pairs:
        raise FileNotFoundError(f"no image files under {tgt_root}")
    return sorted(pairs.values()), others


# --------------------------------------------------------------------------------------------------
# Rating files (published per-image scores and human ratings)


def _read_rating_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing rating file {path}; expected the DreamBench++ ratings "
                                "layout (see tests/data/dreambench_plus/PROVENANCE.md)")
    return parse_json(path.read_text(), f"rating file {path}")


def load_dreambench_scores(root, scorer: str, methods: Sequence[str] = DREAMBENCH_METHODS) -> dict:
    """Read `<root>/<scorer>/<method>.json` for each method -> {method: {canonical key: score}}.

    `scorer` is a folder name such as "data_nearid_rating" (or a nested one,
    "data_gpt_rating/concept_preservation_full").
    """
    root = Path(root)
    return {m: canonicalize_dreambench_scores(_read_rating_file(root / scorer / f"{m}.json"),
                                              f"{scorer}/{m}.json") for m in methods}


def load_dreambench_human(root, methods: Sequence[str] = DREAMBENCH_METHODS) -> dict:
    """Read `<root>/data_human_rating/merged_data/group{1,2}/<method>-cp.json` -> {method: (g1, g2)}."""
    base = Path(root) / "data_human_rating" / "merged_data"
    return {m: tuple(canonicalize_dreambench_scores(_read_rating_file(base / g / f"{m}-cp.json"),
                                                    f"data_human_rating/merged_data/{g}/{m}-cp.json")
                     for g in ("group1", "group2")) for m in methods}


def dreambench_mh_from_files(root, scorer: str, methods: Sequence[str] = DREAMBENCH_METHODS) -> dict:
    """`dreambench_mh` of a scorer folder against the human ratings, both under `root`."""
    scores = load_dreambench_scores(root, scorer, methods)
    human = load_dreambench_human(root, methods)
    return dreambench_mh(scores, human, methods, scorer=scorer)
