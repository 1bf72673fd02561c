"""Heatmaps of what the NearID embedding looks at (docs/method.md, "Seeing identity").

- `attention_map`: the head's attention over the patch grid, averaged over its heads (sums to 1).
- `correspondence_map`: each patch's exact share of the attention-stage cosine similarity between
  a generated image and its references (the MLP after the attention is not decomposed).
- `object_attention_share`, `mask_to_grid`: the share of attention on patches mostly inside an
  object mask, a number to compare heads by.
- `upsample`, `overlay`: a grid map drawn over the image it came from.
- `image_tokens`: the backbone tokens of images through a NearID scorer (one forward each), for
  callers that do not have them already (the scoring pass keeps only the pooled embeddings).

The map functions are pure: backbone tokens and the head in, tensors out. They work on any
`NearIDAttentionPoolingHead` (its `attention_weights`, `attention_output` and parameters).
"""

from __future__ import annotations

import copy
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def grid_side(num_patches: int) -> int:
    """729 -> 27: the side of the square patch grid."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"expected a square patch grid, got {num_patches} patch tokens")
    return side


@torch.no_grad()
def attention_map(head, tokens: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """tokens [B, T, D] -> attention of the probe on each patch [B, T] averaged over heads (sums to 1),
    or [B, T, H] with `per_head`."""
    weights = head.attention_weights(tokens).float()
    return weights if per_head else weights.mean(dim=-1)


@torch.no_grad()
def embeddings(head, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T, D] -> the identity embeddings [B, D] (L2-normalised float64), as the model computes them."""
    dtype = next(head.parameters()).dtype
    return F.normalize(head(tokens.to(dtype)).double(), dim=-1)


@dataclass
class Correspondence:
    """Per-patch shares of cos(o(g), o(r)) at the attention stage, for B generated images.

    shares [B, T]: s_i; bias [B]: the output bias's share; cosine [B]: cos(o(g), o(r)), equal to
    shares.sum(-1) + bias up to float64 rounding.
    """

    shares: torch.Tensor
    bias: torch.Tensor
    cosine: torch.Tensor


def float64_head(head):
    """A float64 copy of `head` (the head itself if it is float64 already): what `correspondence_map` computes
    with. A caller drawing many maps makes it once (so400m's head is 120 MB in float64)."""
    if next(head.parameters()).dtype == torch.float64:
        return head
    return copy.deepcopy(head).double()


@torch.no_grad()
def correspondence_map(head, generated: torch.Tensor, references: torch.Tensor) -> Correspondence:
    """generated [B, T, D] tokens, references [R, T, D] tokens -> `Correspondence` of each generated image
    against the mean attention output of the references. Computed in float64 (`float64_head`).

    The attention output is o = W_o concat_h(sum_i a_h,i (W_v,h x_i + b_v,h)) + b_o, so with
    u = o(r) / (|o(g)| |o(r)|) patch i contributes s_i = sum_h a_h,i (W_v,h x_i + b_v,h) . (W_o^T u)_h.
    """
    head64 = float64_head(head)
    generated, references = generated.double(), references.double()
    out_g = head64.attention_output(generated)  # [B, D]
    out_r = head64.attention_output(references).mean(dim=0)  # [D]
    unit = out_r / (out_g.norm(dim=-1, keepdim=True) * out_r.norm())  # [B, D]
    heads = head64.num_heads
    hidden = generated.shape[-1]
    head_dim = hidden // heads
    w_v = head64.attention.in_proj_weight.chunk(3)[2].view(heads, head_dim, hidden)
    b_v = head64.attention.in_proj_bias.chunk(3)[2].view(heads, head_dim)
    back = (unit @ head64.attention.out_proj.weight).view(-1, heads, head_dim)  # W_o^T u per head [B, H, d_h]
    folded = torch.einsum("bhc,hcd->bhd", back, w_v)  # [B, H, D]
    per_head = torch.einsum("btd,bhd->bth", generated, folded) + torch.einsum("bhc,hc->bh", back, b_v)[:, None]
    shares = (head64.attention_weights(generated) * per_head).sum(dim=-1)  # [B, T]
    bias = unit @ head64.attention.out_proj.bias
    cosine = F.cosine_similarity(out_g, out_r[None], dim=-1)
    return Correspondence(shares, bias, cosine)


def mask_to_grid(mask, side: int) -> np.ndarray:
    """An object mask (PIL image or [H, W] array, nonzero inside) -> bool [side, side]: the patches whose
    area is mostly (more than half) inside the object. The image processor stretches the whole image to
    its square input, so the mask's grid cells are the patches'."""
    inside = (np.asarray(mask) > 0).astype(np.float32)
    if inside.ndim == 3:
        inside = inside.max(axis=-1)
    fraction = np.asarray(Image.fromarray(inside, "F").resize((side, side), Image.BOX))
    return fraction > 0.5


def object_attention_share(attention: torch.Tensor, inside: np.ndarray) -> np.ndarray:
    """attention [B, T] (sums to 1), inside bool [B, side, side] -> share of attention inside [B]."""
    inside = torch.as_tensor(np.asarray(inside).reshape(len(attention), -1), dtype=attention.dtype)
    return (attention * inside).sum(dim=-1).double().numpy()


def upsample(grid_map: torch.Tensor | np.ndarray, size: tuple) -> np.ndarray:
    """A map over the patches [T] or [side, side] -> [H, W] float32, bilinear, for an image of (H, W)."""
    values = torch.as_tensor(np.asarray(grid_map, dtype=np.float32))
    side = grid_side(values.numel())
    grid = values.reshape(1, 1, side, side)
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image, grid_map, signed: bool = False, alpha: float = 0.5, size: int = 256) -> np.ndarray:
    """The map over the image: [H, W, 3] uint8, the image's longer side at most `size`.

    An attention map (non-negative) is scaled to its maximum ("inferno"); a signed map (correspondence)
    to its largest magnitude, red positive and blue negative, zero white ("bwr").
    """
    from matplotlib import colormaps

    picture = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture.thumbnail((size, size))
    pixels = np.asarray(picture, dtype=np.float32) / 255
    heat = upsample(grid_map, pixels.shape[:2])
    if signed:
        scale = float(np.abs(heat).max()) or 1.0
        colours = colormaps["bwr"](0.5 + heat / (2 * scale))[..., :3]
    else:
        scale = float(heat.max()) or 1.0
        colours = colormaps["inferno"](np.clip(heat / scale, 0, 1))[..., :3]
    return np.round(255 * ((1 - alpha) * pixels + alpha * colours)).astype(np.uint8)


CORRESPONDENCE_CAPTION = ("correspondence: each patch's share of the attention-stage cosine cos(o(g), o(r)); "
                          "exact for the attention output, not for the final embedding (the MLP and its residual "
                          "are not decomposed)")


def nearid_head(scorer):
    """The NearID attention-pooling head of a scorer, or a clear error for a baseline."""
    if scorer.kind_name != "nearid":
        raise ValueError(f"heatmaps need a NearID model with its attention-pooling head; {scorer.spec} is a "
                         f"'{scorer.kind_name}' scorer. Give a NearID model folder or Hub id.")
    head = scorer.model.head
    if not hasattr(head, "attention_weights"):  # model code run from a folder exported before the maps existed
        raise ValueError(f"the model code loaded for {scorer.spec} has no attention_weights in its head (it predates "
                         "heatmaps); re-export the model with nearid.hub.export_hub_folder to update its code")
    return head


@torch.inference_mode()
def image_tokens(scorer, images, batch_size: int = 16) -> torch.Tensor:
    """Images (anything `load_image` takes) -> backbone tokens [N, T, D] float32 on the CPU."""
    model = scorer.model
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([scorer.preprocess(image) for image in images[start:start + batch_size]])
        chunks.append(model.forward_features(pixels.to(scorer.device, scorer.dtype)).float().cpu())
    return torch.cat(chunks)


def mtg_object_attention(scorer, mtg_source, split: str = "test") -> dict:
    """Attention on the object over the original views of an MTG split (their object masks are known):
    `object_attention`'s numbers."""
    from nearid.data import readers

    dataset, _ = readers.open_mtg(mtg_source, split)
    # The 6 columns used, each read once and undecoded; the inpainted images are never read.
    columns = readers.mtg_view_columns(dataset, ("original", "object_mask", "part_mask"))
    images, masks = [], []
    for row in range(len(dataset)):
        for view in (1, 2):
            images.append(columns[f"image_{view}_original"][row])
            masks.append(readers.mtg_view_masks(columns, row, view, f"MTG {split} row {row} view {view}")[0])
    return object_attention(scorer, images, masks)


def object_attention(scorer, images, masks, batch_size: int = 64) -> dict:
    """Images with object masks (same order) -> {"object_attention": the mean share of the attention map on
    patches mostly inside the object, "object_patches": the mean share of such patches (what a uniform map
    would get), "images": count}. Tokens are kept one batch at a time (3.4 MB per so400m image)."""
    head = nearid_head(scorer)
    shares, inside_fractions = [], []
    for start in range(0, len(images), batch_size):
        attention = attention_map(head, image_tokens(scorer, images[start:start + batch_size]))
        side = grid_side(attention.shape[-1])
        inside = np.stack([mask_to_grid(mask, side) for mask in masks[start:start + batch_size]])
        shares.append(object_attention_share(attention, inside))
        inside_fractions.append(inside.reshape(len(inside), -1).mean(axis=1))
    shares = np.concatenate(shares)
    return {"object_attention": float(shares.mean()), "object_patches": float(np.concatenate(inside_fractions).mean()),
            "images": len(shares)}


# --------------------------------------------------------------------------------------------------
# Contact sheets


def lowest_scoring(records, count: int) -> dict:
    """Score records -> {(method, subject): the `count` records with the lowest mean score, lowest first}."""
    groups = {}
    for record in records:
        groups.setdefault((str(record["method"]), str(record["subject"])), []).append(record)
    return {group: sorted(members, key=lambda r: r["score_mean"])[:count] for group, members in sorted(groups.items())}


def score_sheet(path, scorer, scored: list, size: int = 192):
    """A contact sheet of scored generations, one row each: the generation with its score, its attention
    map, its correspondence map against its references, then the first reference, its attention map and
    its correspondence map against the generation. `scored` is [(score record, ScoreItem)]."""
    from nearid.images import load_image
    from nearid.reports import plots
    from nearid.search import thumbnail

    head = nearid_head(scorer)
    head64 = float64_head(head)
    # One backbone pass over the sheet's images: the generations of a subject share their references.
    paths = list(dict.fromkeys(item.path(name) for record, item in scored
                               for name in (record["generated"], *record["references"])))
    tokens_of = dict(zip(paths, image_tokens(scorer, paths)))
    rows = []
    for record, item in scored:
        generated = item.path(record["generated"])
        references = [item.path(name) for name in record["references"]]
        tokens = torch.stack([tokens_of[path] for path in (generated, *references)])
        forward = correspondence_map(head64, tokens[:1], tokens[1:])
        backward = correspondence_map(head64, tokens[1:2], tokens[:1])
        attention = attention_map(head, tokens[:2])
        picture, reference = load_image(generated).convert("RGB"), load_image(references[0]).convert("RGB")
        rows.append([
            (thumbnail(picture, size), f"{Path(record['generated']).name}\nscore {record['score_mean']:.3f}"),
            (overlay(picture, attention[0], size=size), "attention"),
            (overlay(picture, forward.shares[0], signed=True, size=size),
             f"correspondence vs {len(references)} ref(s)\nattention-stage cos {float(forward.cosine[0]):.3f}"),
            (thumbnail(reference, size), Path(references[0]).name),
            (overlay(reference, attention[1], size=size), "attention"),
            (overlay(reference, backward.shares[0], signed=True, size=size), "correspondence vs generation"),
        ])
    caption = textwrap.fill(f"{CORRESPONDENCE_CAPTION}; red adds to it, blue takes away", 120)
    method, subject = scored[0][0]["method"], scored[0][0]["subject"]
    title = f"{method} / {subject}: lowest-scoring generations ({scorer.spec})\n{caption}"
    return plots.plot_image_grid(path, rows, title, cell_inches=2.0)

