"""The synthetic datasets, built from `nearid.synthetic.drawing`, and `build_all`, which writes them all.

- Each distractor source uses its own variation, so different sources give different scores.
- MTG rows recolour one part, with part sizes drawn so the oracle `1 - |part| / |object|` varies in (0, 1).
- DreamBench++ generations are the subject in a new scene with 0-3 identity changes; the human
  ratings (two noisy groups) fall with the number of changes, so an identity scorer has positive MH.
- Every random draw comes from `np.random.default_rng([seed, tag, ...])`, one stream per item, so
  the same seed gives byte-identical files and items do not depend on each other's count.

On-disk layout written by `build_all` (see `layout_description` for the same text in README.md):
  positives/            Dataset.save_to_disk
  <source>/             one Dataset per distractor source (default flux, sdxl), joined by row index
  mtg/                  DatasetDict.save_to_disk with splits train, test
  dreambench/samples/<method>/{src_image,tgt_image}/<category>_<NN>_<subject>/<prompt>_<sample>.png
  dreambench/ratings/data_human_rating/merged_data/group{1,2}/<method>-cp.json
  dreambench/ratings/data_synthetic_oracle_rating/<method>.json
  splits/{train,val,test}.json, manifest.json, README.md
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nearid.cli import REQUIRED, option
from nearid.metrics import DREAMBENCH_CATEGORIES, MTG_COLUMNS
from nearid.synthetic.drawing import (
    SCENES,
    SHAPES,
    SUPERSAMPLE,
    VARIATIONS,
    ObjectSpec,
    Pose,
    describe,
    draw_scene,
    mtg_view,
    part_polygon,
    random_pose,
    random_spec,
    render_distractor,
    render_view,
    vary,
)

# Random-stream tags: one per kind of item, so streams never collide.
_IDENTITY, _VIEW, _DISTRACTOR, _MTG, _DREAMBENCH, _SPLIT = range(6)


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SyntheticConfig:
    """What `build_all` generates (every field is a flag of `python -m nearid.synthetic`)"""

    output_dir: str = option(REQUIRED, "folder to write everything into", folder=True)
    num_identities: int = option(24, "rows of positives/ (one identity each)", min=3)
    seed: int = option(0, "master seed; the same seed gives byte-identical files", min=0)
    image_size: int = option(64, "side of every square image, in pixels", min=16)
    two_view_fraction: float = option(0.25, "share of positives rows with only 2 views (img3 missing)", min=0.0,
                                      max=1.0)
    sources: list[str] = option(["flux", "sdxl"], "distractor source folders, NAME or NAME=VARIATION with VARIATION "
                                                  f"in {VARIATIONS}; without '=' the i-th source gets the i-th "
                                                  "(cyclically)")
    image_columns: str = option("img", "positives image column prefix: 'img' (img1..3, the dataset card) or "
                                       "'images' (images1..3, the reference code)", choices=("img", "images"))
    missing_distractor_rate: float = option(0.0, "chance that a present distractor is dropped (None) to exercise "
                                                 "slot alignment; each row keeps at least one", min=0.0, max=1.0)
    mtg_train: int = option(24, "rows of the MTG train split", min=0)
    mtg_test: int = option(16, "rows of the MTG test split", min=0)
    dreambench_methods: list[str] = option(["dreambooth_sd", "blip_diffusion"], "DreamBench++ method folders (at "
                                                                                 "least 2); earlier ones are more "
                                                                                 "faithful")
    dreambench_categories: list[str] = option(["object", "live_subject_animal"],
                                              f"DreamBench++ categories, from {DREAMBENCH_CATEGORIES}")
    dreambench_subjects: int = option(4, "DreamBench++ subjects per category", min=1)
    dreambench_prompts: int = option(5, "DreamBench++ prompts per subject", min=1)
    val_fraction: float = option(0.15, "share of positives rows in splits/val.json", min=0.0, max=1.0)
    test_fraction: float = option(0.15, "share of positives rows in splits/test.json", min=0.0, max=1.0)
    overwrite: bool = option(False, "replace a non-empty output folder")

    def __post_init__(self):
        self.sources, self.dreambench_methods = tuple(self.sources), tuple(self.dreambench_methods)
        self.dreambench_categories = tuple(self.dreambench_categories)
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.num_identities < 3:
            raise ValueError(f"num_identities must be >= 3 (one per split), got {self.num_identities}")
        if len(self.dreambench_methods) < 2 or len(set(self.sources)) != len(self.sources) or not self.sources:
            raise ValueError("need at least 2 dreambench_methods and 1+ distinct sources, got "
                             f"{self.dreambench_methods} and {self.sources}")
        bad = [c for c in self.dreambench_categories if c not in DREAMBENCH_CATEGORIES]
        if bad:
            raise ValueError(f"unknown DreamBench++ categories {bad}; choose from {DREAMBENCH_CATEGORIES}")
        source_variations(self.sources)  # validates NAME=VARIATION


def source_variations(sources) -> dict:
    """`("flux", "sdxl=body_color")` -> {"flux": "marking_color", "sdxl": "body_color"}."""
    out = {}
    for i, entry in enumerate(sources):
        name, _, variation = entry.partition("=")
        variation = variation or VARIATIONS[i % len(VARIATIONS)]
        if variation not in VARIATIONS:
            raise ValueError(f"source {entry!r}: unknown variation {variation!r}; choose from {VARIATIONS}")
        out[name] = variation
    return out


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# --------------------------------------------------------------------------------------------------
# NearID positives and distractor sources


def positives_features(image_columns: str = "img"):
    from datasets import Features, Value
    from datasets import Image as HFImage

    cols = {"id": Value("string"), "category": Value("string"), "category_description": Value("string")}
    cols.update({f"{image_columns}{k}": HFImage() for k in (1, 2, 3)})
    cols.update({"n_images": Value("int64"), "objaverse_id": Value("string")})
    cols.update({f"prompts{k}": Value("string") for k in (1, 2, 3)})
    cols["quality"] = Value("float64")
    return Features(cols)


def source_features():
    from datasets import Features, Value
    from datasets import Image as HFImage

    cols = {"id": Value("string")}
    cols.update({f"nimg{k}": HFImage() for k in (1, 2, 3)})
    cols.update({f"inpaint_mask{k}": HFImage() for k in (1, 2, 3)})
    cols.update({"source": Value("string"), "variation": Value("string")})
    return Features(cols)


def _drop_slots(present: list, rate: float, rng: np.random.Generator) -> list:
    """Randomly drop present distractor slots (never the last one left)."""
    keep = list(present)
    for k in range(3):
        if keep[k] and rng.random() < rate and sum(keep) > 1:
            keep[k] = False
    return keep


def benchmark_row(cfg: SyntheticConfig, i: int) -> tuple:
    """Positives row i and {source: row}: the identity in 2-3 views, each with one twin per source."""
    rng = _rng(cfg.seed, _IDENTITY, i)
    spec, quality = random_spec(rng), float(rng.uniform(0.5, 1.0))
    n_views = 2 if rng.random() < cfg.two_view_fraction else 3
    variations = source_variations(cfg.sources)
    pos = {"id": f"obj_{i:05d}", "category": spec.shape, "category_description": SHAPES[spec.shape],
           "n_images": n_views, "quality": round(quality, 3),
           "objaverse_id": hashlib.md5(f"nearid-synthetic-{cfg.seed}-{i}".encode()).hexdigest()}
    rows = {s: {"id": pos["id"], "source": s, "variation": v} for s, v in variations.items()}
    keeps = {s: _drop_slots([k < n_views for k in range(3)], cfg.missing_distractor_rate,
                            _rng(cfg.seed, _DISTRACTOR, j, i, 99)) for j, s in enumerate(variations)}
    for k in range(3):
        present, view_rng = k < n_views, _rng(cfg.seed, _VIEW, i, k)
        pose, scene = random_pose(view_rng), draw_scene(view_rng, cfg.image_size * SUPERSAMPLE)
        scene_name = SCENES[int(view_rng.integers(len(SCENES)))]
        image, mask = render_view(spec, pose, scene) if present else (None, None)
        pos[f"{cfg.image_columns}{k + 1}"] = image
        pos[f"prompts{k + 1}"] = f"{describe(spec)} {scene_name}" if present else None
        for j, (s, variation) in enumerate(variations.items()):
            nimg, inpaint = None, None
            if present and keeps[s][k]:
                twin = vary(spec, variation, _rng(cfg.seed, _DISTRACTOR, j, i, k))
                nimg, inpaint = render_distractor(twin, pose, scene, mask)
            rows[s].update({f"nimg{k + 1}": nimg, f"inpaint_mask{k + 1}": inpaint})
    return pos, rows


def _dataset(rows: list, features):
    """A Dataset with exactly the columns of `features`, in that order."""
    from datasets import Dataset

    return Dataset.from_dict({c: [row[c] for row in rows] for c in features}, features=features)


def build_benchmark(cfg: SyntheticConfig) -> tuple:
    """(positives Dataset, {source name: Dataset}), rows aligned by index with equal `id`s."""
    positives, sources = [], {s: [] for s in source_variations(cfg.sources)}
    for i in range(cfg.num_identities):
        pos, rows = benchmark_row(cfg, i)
        positives.append(pos)
        for s, row in rows.items():
            sources[s].append(row)
    pos_ds = _dataset(positives, positives_features(cfg.image_columns))
    return pos_ds, {s: _dataset(rows, source_features()) for s, rows in sources.items()}


# --------------------------------------------------------------------------------------------------
# MTG (part-level)


def mtg_row(cfg: SyntheticConfig, split: int, r: int) -> dict:
    rng = _rng(cfg.seed, _MTG, split, r)
    spec = random_spec(rng)
    part, changed = part_polygon(spec, rng)
    row = {}
    for v in (1, 2):
        images = mtg_view(spec, changed, part, _rng(cfg.seed, _MTG, split, r, v), cfg.image_size)
        for kind, image in zip(("original", "inpainted", "object_mask", "part_mask"), images):
            row[f"image_{v}_{kind}"] = image
    return row


def build_mtg(cfg: SyntheticConfig):
    """DatasetDict with splits `train` and `test` and the 8 `MTG_COLUMNS` (masks are L images)."""
    from datasets import DatasetDict, Features
    from datasets import Image as HFImage

    features = Features({c: HFImage() for c in MTG_COLUMNS})
    return DatasetDict({name: _dataset([mtg_row(cfg, s, r) for r in range(n)], features)
                        for s, (name, n) in enumerate((("train", cfg.mtg_train), ("test", cfg.mtg_test)))})


# --------------------------------------------------------------------------------------------------
# DreamBench++


def dreambench_items(cfg: SyntheticConfig) -> list:
    """[(category, subject index, subject name, spec)] of every DreamBench++ subject."""
    items = []
    for c, category in enumerate(cfg.dreambench_categories):
        for n in range(cfg.dreambench_subjects):
            spec = random_spec(_rng(cfg.seed, _DREAMBENCH, 0, c, n), animal=category.startswith("live_subject"))
            items.append((category, n, f"{describe(spec).split()[1]}_{spec.shape}", spec))
    return items


def _generation(spec: ObjectSpec, method_index: int, rng: np.random.Generator) -> tuple:
    """(generated spec, number of identity changes 0-3); later methods change identity more often."""
    p_faithful = max(0.15, 0.6 - 0.2 * method_index)
    changes = 0 if rng.random() < p_faithful else int(rng.integers(1, 4))
    out = spec
    for variation in rng.permutation(VARIATIONS)[:changes]:
        out = vary(out, str(variation), rng)
    return out, changes


def _human_rating(changes: int, rng: np.random.Generator) -> int:
    """A noisy 0-4 concept-preservation rating that falls with the number of identity changes."""
    return int(np.clip(np.round(4 - 1.3 * changes + rng.normal(0, 0.7)), 0, 4))


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def build_dreambench(cfg: SyntheticConfig, root: Path) -> dict:
    """Write samples/ and ratings/ under `root`; returns the oracle scores {method: {key_0: score}}.

    The reference (src_image) of a subject is the same for every method and prompt; each generated
    image (tgt_image) shows the subject, possibly with identity changes, in a new scene and pose.
    """
    side, oracle_by_method = cfg.image_size * SUPERSAMPLE, {}
    for m, method in enumerate(cfg.dreambench_methods):
        human, oracle = ({}, {}), {}
        for c, (category, n, subject, spec) in enumerate(dreambench_items(cfg)):
            centred = Pose(0.3, 0.0, (0.5, 0.5))
            reference, _ = render_view(spec, centred, draw_scene(_rng(cfg.seed, _DREAMBENCH, 1, c), side))
            folder = f"{category}_{n:02d}_{subject}"
            for p in range(cfg.dreambench_prompts):
                rng = _rng(cfg.seed, _DREAMBENCH, 2, m, c, p)
                generated_spec, changes = _generation(spec, m, rng)
                generated, _ = render_view(generated_spec, random_pose(rng), draw_scene(rng, side))
                _save_png(reference, root / "samples" / method / "src_image" / folder / f"{p}_0.png")
                _save_png(generated, root / "samples" / method / "tgt_image" / folder / f"{p}_0.png")
                for g in (0, 1):
                    human[g][f"{folder}-{p}"] = _human_rating(changes, rng)
                oracle[f"{folder}-{p}_0"] = 100.0 * (1 - changes / 3)
        oracle_by_method[method] = oracle
        _write_ratings(root / "ratings", method, human, oracle)
    return oracle_by_method


def _write_ratings(root: Path, method: str, human: tuple, oracle: dict) -> None:
    for g, ratings in enumerate(human, start=1):
        _write_json(root / "data_human_rating" / "merged_data" / f"group{g}" / f"{method}-cp.json", ratings)
    _write_json(root / "data_synthetic_oracle_rating" / f"{method}.json", oracle)


# --------------------------------------------------------------------------------------------------
# Splits, manifest, everything at once


def make_splits(n: int, seed: int, val_fraction: float, test_fraction: float) -> dict:
    """Disjoint sorted row-index lists {train, val, test} covering range(n); each non-empty."""
    order = _rng(seed, _SPLIT).permutation(n).tolist()
    n_test = max(1, int(round(n * test_fraction)))
    n_val = max(1, int(round(n * val_fraction)))
    if n_test + n_val >= n:
        raise ValueError(f"val/test fractions {val_fraction}/{test_fraction} leave no training rows of {n}")
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def layout_description(cfg: SyntheticConfig) -> dict:
    ic = cfg.image_columns
    return {
        "positives/": f"Dataset.save_to_disk; columns {list(positives_features(ic))}; {ic}3 and prompts3 "
                      "are None when n_images == 2",
        "<source>/": f"one Dataset per source {list(source_variations(cfg.sources))}; columns "
                     f"{list(source_features())}; row i pairs with positives row i (same id); nimgK is "
                     "the distractor in imgK's scene, None where imgK is missing (or dropped); "
                     "inpaint_maskK (L, 255 inside) is the only region where nimgK differs from imgK",
        "mtg/": f"DatasetDict.save_to_disk with splits train, test (mtg/train, mtg/test); columns "
                f"{list(MTG_COLUMNS)}; masks are L images, 255 inside",
        "dreambench/samples/<method>/{src_image,tgt_image}/<category>_<NN>_<subject>/<prompt>_<sample>.png":
            "reference and generated image at the same relative path; key = relative path without "
            "extension, '/' -> '-'",
        "dreambench/ratings/data_human_rating/merged_data/group{1,2}/<method>-cp.json":
            "integer human ratings 0-4, keys without the _<sample> suffix",
        "dreambench/ratings/data_synthetic_oracle_rating/<method>.json":
            "ground truth 100 * (1 - identity changes / 3), keys with the _<sample> suffix",
        "splits/{train,val,test}.json": "disjoint JSON lists of positives row indices covering all rows",
    }


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _prepare_output(cfg: SyntheticConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"output folder {out} already exists and is not empty. Use --overwrite "
                                  "to replace it, or choose another --output-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_all(cfg: SyntheticConfig) -> dict:
    """Write every dataset under `cfg.output_dir` (layout in `layout_description`); returns the manifest."""
    out = _prepare_output(cfg)
    positives, sources = build_benchmark(cfg)
    positives.save_to_disk(str(out / "positives"))
    for name, ds in sources.items():
        ds.save_to_disk(str(out / name))
    mtg = build_mtg(cfg)
    mtg.save_to_disk(str(out / "mtg"))
    build_dreambench(cfg, out / "dreambench")
    splits = make_splits(cfg.num_identities, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    for name, rows in splits.items():
        _write_json(out / "splits" / f"{name}.json", rows)
    manifest = {
        "generator": "nearid.synthetic", "config": dataclasses.asdict(cfg),
        "image_columns": [f"{cfg.image_columns}{k}" for k in (1, 2, 3)],
        "sources": source_variations(cfg.sources),
        "counts": {"positives": len(positives), "two_view_rows": int(sum(n == 2 for n in positives["n_images"])),
                   "mtg_train": len(mtg["train"]), "mtg_test": len(mtg["test"]),
                   "dreambench_images_per_method": len(dreambench_items(cfg)) * cfg.dreambench_prompts,
                   **{f"split_{k}": len(v) for k, v in splits.items()}},
        "layout": layout_description(cfg),
    }
    manifest["config"]["output_dir"] = str(out)
    _write_json(out / "manifest.json", manifest)
    (out / "README.md").write_text(_readme(manifest))
    return manifest


def _readme(manifest: dict) -> str:
    lines = ["# Synthetic NearID benchmarks", "",
             "Generated by `python -m nearid.synthetic` (procedural objects drawn with PIL; no real data). "
             "Same config and seed give byte-identical image data.", "",
             f"Config: `{json.dumps(manifest['config'])}`", "", "Counts:", ""]
    lines += [f"- {k}: {v}" for k, v in manifest["counts"].items()]
    sources = ", ".join(f"`{k}` ({v})" for k, v in manifest["sources"].items())
    lines += ["", f"Distractor sources (variation changed): {sources}",
              "", "Layout:", ""]
    lines += [f"- `{k}`: {v}" for k, v in manifest["layout"].items()]
    return "\n".join(lines) + "\n"
