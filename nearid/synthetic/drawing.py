"""Drawing the synthetic identities: procedural objects, scenes, views and near-identity distractors.

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
  silhouettes) is the distractor's inpaint mask.
- An MTG view recolours one *part* (a band of the body or the marking) inside the part mask
  (`part_polygon`, `mtg_view`).

Every function draws from the `np.random.Generator` it is given; `nearid.synthetic.builders` decides
which stream each item gets.
"""

from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
    t = np.linspace(0, 1, side)[:, None]
    # The gradient changes along one axis: one line of pixels, rounded once, then repeated.
    grad = np.broadcast_to((c0 * (1 - t) + c1 * t).round().astype(np.uint8)[:, None], (side, side, 3))
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    scene = Image.fromarray(np.ascontiguousarray(grad))
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
# MTG (part-level)


def part_polygon(spec: ObjectSpec, rng: np.random.Generator) -> tuple:
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
