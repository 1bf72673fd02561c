"""NearID from Python: score generated images against references, or embed images, in a few lines.

    from nearid import IdentityScorer

    scorer = IdentityScorer("Aleksandar/nearid-siglip2")          # a Hub id or a local folder
    scorer.score("reference.jpg", "generated.png")                # 0.87: cosine similarity
    scorer.score(["ref_front.jpg", "ref_side.jpg"], ["gen1.png", "gen2.png"])   # per image, mean over refs
    table = scorer.score_folders("references/", "generations/")   # DreamBooth layout, per method and subject
    print(table.markdown())
    vectors = scorer.embed(["a.png", pil_image])                  # [N, D] float32, L2-normalised
    maps = scorer.heatmaps("reference.jpg", ["gen1.png", "gen2.png"])   # where the head looks, as arrays
    maps.attention[0], maps.correspondence[0]                     # [27, 27] each for so400m at 384 px

Images may be file paths, encoded bytes, PIL images, uint8 arrays, or folders (their images,
sorted). Everything goes through the commands' own pieces: the one decode, the model's processor,
the embed-once store and `nearid.scoring`, so the same files give the same numbers as
`evaluate.py score`. Pass `cache_dir` to keep embeddings between sessions (and share them with the
commands' `--cache-dir`); by default they live in a temporary folder owned by the scorer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nearid import heatmaps, scoring
from nearid.data import score_inputs
from nearid.evaluation import protocol
from nearid.images import find_images
from nearid.numerics import resolve_device, resolve_precision
from nearid.scorers import DTYPES, Scorer
from nearid.store.fill import FillOptions
from nearid.store.image_index import ImageIndex

DEFAULT_MODEL = "Aleksandar/nearid-siglip2"


@dataclass
class ScoreTable:
    """Scores of generated images: one record per scored image, summaries per method and subject,
    and everything left out with the reason (`nearid.scoring` describes the fields)."""

    records: list
    summary: dict
    skipped: list = field(default_factory=list)
    unused_references: list = field(default_factory=list)  # (reference folder, method) pairs nothing was generated for

    def markdown(self) -> str:
        """The summary as `evaluate.py score` writes it (score_summary.md): the tables, methods side by side
        when there are several, what was left out and the references no method generated for."""
        return scoring.summary_markdown(self.summary, self.skipped, self.unused_references, "`ScoreTable.skipped`")


@dataclass
class Heatmaps:
    """Maps over the patch grid (docs/method.md, "Seeing identity"), as float arrays.

    attention [G, S, S]: the head's attention on each generated image (mean over heads, sums to 1);
    reference_attention [R, S, S]: the same on each reference;
    scores [G, R]: the identity scores (cosine similarity of the final embeddings), from the same tokens;
    correspondence [G, S, S]: each patch's share of cos(o(g), o(r)) at the attention stage, against the
    mean attention output of the references; with `correspondence_bias` [G] it sums to
    `attention_cosine` [G]. Exact for the attention output, not for the final embedding (the MLP
    and its residual are not decomposed). `heatmaps.overlay(image, map)` draws one over its image.
    """

    attention: np.ndarray
    reference_attention: np.ndarray
    scores: np.ndarray
    correspondence: np.ndarray
    correspondence_bias: np.ndarray
    attention_cosine: np.ndarray


class IdentityScorer:
    """Identity scores and embeddings with NearID (or a baseline as KIND:MODEL, as in evaluate.py).

    Args:
        model: a NearID model, Hub id or local folder, or `clip:...`, `dinov2:...`, ... as the commands take.
        revision: a Hub revision to pin (branch, tag or commit hash); ignored for a local folder, as in
            transformers' `from_pretrained`.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        dtype: "float32", "bfloat16" or "float16".
        mixed_precision: the autocast precision of the forward pass, resolved for `device` as evaluate.py's
            --mixed-precision (`nearid.numerics.resolve_precision`): "auto" is bf16 on a CUDA GPU and none
            elsewhere; "no", "fp16" or "bf16" as given. The store keeps the embeddings of each precision apart.
        cache_dir: the embed-once store; default a temporary folder removed with the scorer.
        batch_size, num_workers: how images are batched and decoded (not what they score).
        skip_bad_images: leave unreadable images out (listed) instead of raising.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, revision: str | None = None, device: str = "auto",
                 dtype: str = "float32", mixed_precision: str = "auto", cache_dir=None, batch_size: int = 32,
                 num_workers: int = 0, skip_bad_images: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        device = resolve_device(device)
        self.scorer = Scorer(model, revision, device, DTYPES[dtype], resolve_precision(mixed_precision, device))
        self._temporary = None if cache_dir else tempfile.TemporaryDirectory(prefix="nearid-embeddings-")
        self.cache_dir = Path(cache_dir) if cache_dir else Path(self._temporary.name)
        self.skip_bad_images = skip_bad_images
        self.options = FillOptions(batch_size=batch_size, num_workers=num_workers, skip_errors=skip_bad_images,
                                   progress=False, device=self.scorer.device)

    def embed(self, images) -> np.ndarray:
        """L2-normalised embeddings [N, D] (float32) of one image or a list, in order (folders expanded)."""
        index = ImageIndex(self.skip_bad_images)
        keys = self._add(index, _as_list(images))
        embedded = self._embed(index)
        matrix, present = protocol.embedding_matrix(embedded.vectors, keys, embedded.vectors.dim)
        if not present.all():
            matrix[~present] = np.nan  # left out (skip_bad_images): a row that cannot be mistaken for a score
        return matrix

    def similarity(self, a, b) -> np.ndarray:
        """Cosine similarities [len(a), len(b)] between two images or lists of images."""
        return self.embed(a).astype(np.float64) @ self.embed(b).astype(np.float64).T

    def score(self, references, generated, reduce: str = "mean"):
        """How well `generated` keeps the identity of `references`: cosine similarity to each reference,
        reduced over the references by "mean" or "max" (a float for one generated image, an array
        for several); reduce=None returns the [generated, references] matrix."""
        if reduce not in ("mean", "max", None):
            raise ValueError(f"reduce must be 'mean', 'max' or None, got {reduce!r}")
        single = not isinstance(generated, (list, tuple)) and not _is_folder(generated)
        sims = self.similarity(generated, references)
        if reduce is None:
            return sims
        reduced = sims.mean(axis=1) if reduce == "mean" else sims.max(axis=1)
        return float(reduced[0]) if single else reduced

    def score_folders(self, references, generations, methods=None) -> ScoreTable:
        """Score the DreamBooth layout: references/<subject>/* against generations/<method>/<subject>/*
        (or generations/<subject>/* for one method); every generation against all references of its
        subject. The same numbers and tables as `evaluate.py score --references ... --generations ...`."""
        items, other_files, unused = score_inputs.score_items_from_subject_folders(references, generations, methods)
        index = ImageIndex(self.skip_bad_images)
        generated, refs = scoring.index_items(items, index)
        embedded = self._embed(index)
        records, unscored = scoring.score_records(items, generated, refs, embedded.vectors)
        skipped = scoring.left_out(embedded.skipped, unscored, other_files)
        return ScoreTable(records, scoring.summarize_scores(records, unscored), skipped, unused)

    def heatmaps(self, references, generated) -> Heatmaps:
        """Attention and correspondence maps of `generated` (one image or a list) against `references`.

        Runs the backbone once per image (the embedding cache keeps pooled embeddings, not tokens); the
        identity scores come from the same tokens, so the maps cost no second pass."""
        head = heatmaps.nearid_head(self.scorer)
        refs = heatmaps.image_tokens(self.scorer, _expand(references))
        gens = heatmaps.image_tokens(self.scorer, _expand(generated))
        side = heatmaps.grid_side(gens.shape[1])
        corr = heatmaps.correspondence_map(head, gens, refs)

        def grid(values):
            return values.numpy().reshape(len(values), side, side)

        embeddings = heatmaps.embeddings(head, torch.cat([gens, refs]))
        scores = (embeddings[:len(gens)] @ embeddings[len(gens):].T).numpy()
        return Heatmaps(grid(heatmaps.attention_map(head, gens)), grid(heatmaps.attention_map(head, refs)),
                        scores, grid(corr.shares), corr.bias.numpy(), corr.cosine.numpy())

    def _add(self, index: ImageIndex, images: list) -> list:
        keys = []
        for image in images:
            if _is_folder(image):
                keys += index.add_files(find_images(image)[0])
            elif isinstance(image, (str, Path)):
                keys += index.add_files([image])
            else:
                keys += index.add_images([image])
        return keys

    def _embed(self, index: ImageIndex) -> protocol.Embedded:
        return protocol.embed_images(self.scorer, index, self.cache_dir, self.options)


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _expand(images) -> list:
    """One image, a list, or folders -> a flat list of images (a folder's images sorted)."""
    expanded = []
    for image in _as_list(images):
        expanded += find_images(image)[0] if _is_folder(image) else [image]
    return expanded


def _is_folder(image) -> bool:
    return isinstance(image, (str, Path)) and Path(image).is_dir()
