"""Deterministic synthetic NearID benchmarks with exactly the Hub schemas (docs/method.md sections 3 and 4).

Tests, the demo, evaluation and training smoke runs need data shaped like the real Hub datasets
(`Aleksandar/NearID`, `Aleksandar/NearID-<Source>`, `abdo-eldesokey/mtg-dataset`, DreamBench++)
without a network. This module draws it with PIL in a few seconds.

Design:
- An *identity* is a procedural object (`ObjectSpec`): a body shape (the category), a body colour
  and a small distinctive marking (kind, colour, position). Animals get eyes and ears.
- A *view* is the object under a pose (scale, rotation, position) in its own background scene.
  Everything is drawn at `SUPERSAMPLE` x the output size and box-downsampled, so edges are smooth.
- A *distractor* is a near-identity object: the same spec with ONE identity-defining detail
  changed (a `VARIATIONS` entry), composited into exactly the same supersampled background with the
  same pose. Downsampling averages fixed pixel blocks, so every output pixel whose block holds no
  object pixel of either image is byte-identical between positive and distractor. That is what the
  benchmark relies on: the scene is shared exactly, so only identity can separate the two, and a
  scorer that keys on background or layout cannot win. The inpainted region (union of both object
  silhouettes) is stored as `inpaint_mask<K>`.
- Each distractor source uses its own variation, so different sources give different scores.
- MTG rows recolour one *part* (a band of the body or the marking) inside the part mask, with part
  sizes drawn so the oracle `1 - |part| / |object|` varies in (0, 1).
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

CLI: python -m nearid.synthetic --output-dir DIR [--num-identities N] [--seed S] [--image-size PX]
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nearid.cli import REQUIRED, build_parser, option, parse, user_errors
from nearid.metrics import DREAMBENCH_CATEGORIES, MTG_COLUMNS

SUPERSAMPLE = 4
# category -> description; the body polygon is built in `_body_polygon`.
SHAPES = {
    "pebble": "a smooth oval pebble-like toy",
    "crate": "a box-shaped toy with bevelled corners",
    "cone": "a triangular cone-shaped toy",
    "gem": "a diamond-shaped gem toy",
    "nut": "a hexagonal nut-shaped toy",
    "star": "a five-pointed star-shaped toy",
}
MARKINGS = ("dot", "square", "triangle", "cross", "ring", "stripe")
VARIATIONS = ("marking_color", "marking_shape", "body_color", "marking_position")
SCENES = ("in a meadow", "on a wooden desk", "on a beach", "in a kitchen", "on a city street",
          "in a forest", "on a snowy hill", "in a living room")
HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "violet", "pink")
# Random-stream tags: one per kind of item, so streams never collide.
_IDENTITY, _VIEW, _DISTRACTOR, _MTG, _DREAMBENCH, _SPLIT = range(6)


# --------------------------------------------------------------------------------------------------
# Configuration and CLI


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


def parse_args(argv=None) -> tuple:
    """(SyntheticConfig, debug) from the command line."""
    parser = build_parser("python -m nearid.synthetic", __doc__.split("\n\n")[0], groups=(SyntheticConfig,))
    _, groups, debug = parse(parser, (SyntheticConfig,), argv)
    return groups[SyntheticConfig], debug


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
# Objects, scenes and rendering


@dataclass(frozen=True)
class ObjectSpec:
    """One identity. Hues in [0, 1); offsets and sizes in body units (body radius ~ 1)."""

    shape: str
    aspect: float
    body_hue: float
    body_sv: tuple
    marking: str
    marking_hue: float
    marking_offset: tuple
    marking_size: float
    animal: bool = False


@dataclass(frozen=True)
class Pose:
    """Object radius as a share of the image side, rotation in radians, centre in [0, 1]^2."""

    scale: float
    angle: float
    center: tuple


def random_spec(rng: np.random.Generator, animal: bool = False) -> ObjectSpec:
    body_hue = float(rng.random())
    return ObjectSpec(
        shape=str(rng.choice(list(SHAPES))), aspect=float(rng.uniform(0.75, 1.0)), body_hue=body_hue,
        body_sv=(float(rng.uniform(0.45, 0.9)), float(rng.uniform(0.55, 0.95))),
        marking=str(rng.choice(MARKINGS)), marking_hue=(body_hue + rng.uniform(0.3, 0.7)) % 1.0,
        marking_offset=tuple(float(v) for v in rng.uniform(-0.2, 0.2, 2)),
        marking_size=float(rng.uniform(0.3, 0.42)), animal=animal)


def vary(spec: ObjectSpec, variation: str, rng: np.random.Generator) -> ObjectSpec:
    """A near-identity twin: `spec` with one identity-defining detail changed."""
    if variation == "marking_color":
        return dataclasses.replace(spec, marking_hue=(spec.marking_hue + rng.uniform(0.3, 0.7)) % 1.0)
    if variation == "marking_shape":
        others = [m for m in MARKINGS if m != spec.marking]
        return dataclasses.replace(spec, marking=str(rng.choice(others)))
    if variation == "body_color":
        return dataclasses.replace(spec, body_hue=(spec.body_hue + rng.uniform(0.15, 0.35)) % 1.0)
    if variation == "marking_position":
        dx, dy = spec.marking_offset
        return dataclasses.replace(spec, marking_offset=(-dx - 0.3 * np.sign(dx or 1), 0.45 - dy))
    raise ValueError(f"unknown variation {variation!r}; choose from {VARIATIONS}")


def random_pose(rng: np.random.Generator) -> Pose:
    scale = float(rng.uniform(0.24, 0.32))
    margin = scale * 1.15
    center = tuple(float(v) for v in rng.uniform(margin, 1 - margin, 2))
    return Pose(scale, float(rng.uniform(-np.pi, np.pi)), center)


def _rgb(hue: float, sat: float, val: float) -> tuple:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, sat, val))


def _polygon(n: int, radius=1.0, phase=0.0, aspect=1.0, inner=None) -> np.ndarray:
    """Regular n-gon (or 2n-point star when `inner` is given) as an [n, 2] array."""
    t = phase + 2 * np.pi * np.arange(2 * n if inner else n) / (2 * n if inner else n)
    r = np.where(np.arange(len(t)) % 2, inner, radius) if inner else np.full(len(t), radius)
    return np.stack([np.cos(t) * r, np.sin(t) * r * aspect], 1)


def _body_polygon(spec: ObjectSpec) -> np.ndarray:
    a = spec.aspect
    if spec.shape == "pebble":
        return _polygon(48, aspect=a)
    if spec.shape == "crate":
        c = 0.25
        return np.array([(-1 + c, -a), (1 - c, -a), (1, -a + c), (1, a - c), (1 - c, a), (-1 + c, a),
                         (-1, a - c), (-1, -a + c)])
    if spec.shape == "cone":
        return _polygon(3, phase=-np.pi / 2, aspect=a) * 1.1
    if spec.shape == "gem":
        return _polygon(4, aspect=a)
    if spec.shape == "nut":
        return _polygon(6, aspect=a)
    return _polygon(5, phase=-np.pi / 2, inner=0.6)


def _marking_strokes(spec: ObjectSpec) -> list:
    """(polygon, rgb) strokes of the marking, in body units; drawn after the body."""
    s, off = spec.marking_size, np.array(spec.marking_offset)
    colour, body = _rgb(spec.marking_hue, 0.9, 0.95), _rgb(spec.body_hue, *spec.body_sv)
    if spec.marking == "ring":
        return [(_polygon(24, s) + off, colour), (_polygon(24, s * 0.5) + off, body)]
    if spec.marking == "stripe":
        return [(np.array([(-1.5, -s / 3), (1.5, -s / 3), (1.5, s / 3), (-1.5, s / 3)]) + (0, off[1]), colour)]
    if spec.marking == "cross":
        w = s / 3
        corner, turn = np.array([(-s, -w), (-w, -w), (-w, -s)]), np.array([[0, 1], [-1, 0]])
        arm = np.concatenate([corner @ np.linalg.matrix_power(turn, q) for q in range(4)])  # 4 x 90 deg
        return [(arm + off, colour)]
    n, phase = {"dot": (24, 0.0), "square": (4, np.pi / 4), "triangle": (3, -np.pi / 2)}[spec.marking]
    return [(_polygon(n, s * (1.25 if n == 4 else 1.0), phase) + off, colour)]


def _animal_strokes(spec: ObjectSpec) -> tuple:
    """(silhouette extras, feature strokes): two ears above the body, two eyes in it."""
    ears = [np.array([(x - 0.25, -0.7), (x + 0.25, -0.7), (x, -1.25)]) for x in (-0.45, 0.45)]
    eyes = []
    for x in (-0.35, 0.35):
        eyes += [(_polygon(16, 0.16) + (x, -0.3), (250, 250, 250)), (_polygon(12, 0.08) + (x, -0.3), (20, 20, 20))]
    return ears, eyes


def object_strokes(spec: ObjectSpec) -> tuple:
    """(silhouette polygons, [(polygon, rgb)] paint strokes in drawing order), in body units."""
    body_rgb = _rgb(spec.body_hue, *spec.body_sv)
    silhouette = [_body_polygon(spec)]
    strokes = [(silhouette[0], body_rgb)]
    if spec.animal:
        ears, eyes = _animal_strokes(spec)
        silhouette += ears
        strokes = [(p, body_rgb) for p in silhouette] + strokes[1:]
    strokes += _marking_strokes(spec)
    if spec.animal:
        strokes += eyes
    return silhouette, strokes


def _to_pixels(points: np.ndarray, pose: Pose, side: int) -> list:
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    p = points @ np.array([[c, s], [-s, c]]) * pose.scale * side + np.array(pose.center) * side
    return [tuple(q) for q in p.round(2).tolist()]


def draw_object(spec: ObjectSpec, pose: Pose, side: int) -> tuple:
    """Paint layer (RGB) and silhouette (L, 255 inside) at `side` pixels (already supersampled)."""
    silhouette, strokes = object_strokes(spec)
    paint, mask = Image.new("RGB", (side, side)), Image.new("L", (side, side), 0)
    for poly in silhouette:
        ImageDraw.Draw(mask).polygon(_to_pixels(poly, pose, side), fill=255)
    draw = ImageDraw.Draw(paint)
    for poly, rgb in strokes:
        draw.polygon(_to_pixels(poly, pose, side), fill=rgb)
    return paint, mask


def draw_scene(rng: np.random.Generator, side: int) -> Image.Image:
    """A background: a two-colour gradient, a ground band and a few muted blobs."""
    c0, c1 = (np.array(_rgb(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.95))) for _ in range(2))
    t = np.linspace(0, 1, side)[:, None, None]
    grad = np.broadcast_to(c0 * (1 - t) + c1 * t, (side, side, 3))
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    scene = Image.fromarray(np.ascontiguousarray(grad).round().astype(np.uint8))
    draw = ImageDraw.Draw(scene)
    horizon = int(side * rng.uniform(0.55, 0.8))
    draw.rectangle((0, horizon, side, side), fill=_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.7)))
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(-0.1, 0.9, 2) * side
        w, h = rng.uniform(0.08, 0.3, 2) * side
        box = (x0, y0, x0 + w, y0 + h)
        colour = _rgb(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.3, 0.9))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return scene


def _down(image: Image.Image) -> Image.Image:
    return image.reduce(SUPERSAMPLE)


def _binary(mask_ss: Image.Image) -> Image.Image:
    """Supersampled 0/255 mask -> output-size mask, 255 wherever any subpixel is set."""
    return Image.fromarray(np.where(np.asarray(_down(mask_ss)) > 0, 255, 0).astype(np.uint8), "L")


def render_view(spec: ObjectSpec, pose: Pose, scene: Image.Image) -> tuple:
    """(image at output size, supersampled silhouette) of `spec` composited into `scene`."""
    paint, mask = draw_object(spec, pose, scene.size[0])
    return _down(Image.composite(paint, scene, mask)), mask


def render_distractor(twin: ObjectSpec, pose: Pose, scene: Image.Image, mask: Image.Image) -> tuple:
    """(distractor, inpaint mask): `twin` in the same scene and pose as the positive with `mask`.

    The inpaint mask is the union of both silhouettes; outside it the distractor is byte-identical
    to the positive, because both downsample the same untouched scene pixels there.
    """
    twin_paint, twin_mask = draw_object(twin, pose, scene.size[0])
    distractor = _down(Image.composite(twin_paint, scene, twin_mask))
    return distractor, _binary(Image.fromarray(np.maximum(np.asarray(mask), np.asarray(twin_mask)), "L"))


def describe(spec: ObjectSpec) -> str:
    def name(h):
        return HUE_NAMES[int(h * len(HUE_NAMES)) % len(HUE_NAMES)]

    kind = "animal" if spec.animal else "toy"
    return f"a {name(spec.body_hue)} {spec.shape} {kind} with a {name(spec.marking_hue)} {spec.marking} marking"


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


def _part_polygon(spec: ObjectSpec, rng: np.random.Generator) -> tuple:
    """(part region polygon in body units, changed spec): a band of the body or the marking."""
    if rng.random() < 0.3:
        changed = vary(spec, "marking_color", rng)
        return _marking_strokes(spec)[0][0], changed
    # The part is the body above local y = cut; the range keeps both part and rest non-empty.
    cut = float(rng.uniform(-0.5, 0.25) * spec.aspect)
    band = np.array([(-2.0, -2.0), (2.0, -2.0), (2.0, cut), (-2.0, cut)])
    changed = dataclasses.replace(vary(spec, "body_color", rng), marking_hue=(spec.marking_hue + 0.5) % 1.0)
    return band, changed


def mtg_view(spec: ObjectSpec, changed: ObjectSpec, part: np.ndarray, rng, size: int) -> tuple:
    """(original, inpainted, object mask, part mask) of one view; the part is regenerated only."""
    side, pose = size * SUPERSAMPLE, random_pose(rng)
    scene = draw_scene(rng, side)
    paint, obj = draw_object(spec, pose, side)
    original = Image.composite(paint, scene, obj)
    part_region = Image.new("L", (side, side), 0)
    ImageDraw.Draw(part_region).polygon(_to_pixels(part, pose, side), fill=255)
    part_mask = Image.fromarray(np.minimum(np.asarray(part_region), np.asarray(obj)), "L")
    new_paint, _ = draw_object(changed, pose, side)
    inpainted = Image.composite(new_paint, original, part_mask)
    return _down(original), _down(inpainted), _binary(obj), _binary(part_mask)


def mtg_row(cfg: SyntheticConfig, split: int, r: int) -> dict:
    rng = _rng(cfg.seed, _MTG, split, r)
    spec = random_spec(rng)
    part, changed = _part_polygon(spec, rng)
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
# Splits, manifest, entry points


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


def main(argv=None) -> dict:
    """CLI entry point; returns the manifest (also written to `<output_dir>/manifest.json`)."""
    from datasets.utils.logging import disable_progress_bar

    cfg, debug = parse_args(argv)
    with user_errors(debug):
        disable_progress_bar()  # a few tiny saves; the bars would only clutter the summary line
        manifest = build_all(cfg)
    print(json.dumps({"output_dir": manifest["config"]["output_dir"], **manifest["counts"]}))
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
