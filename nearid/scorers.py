"""Scorers: NearID and the paper's baselines behind one interface (images -> normalised embeddings).

A scorer is named by a spec string `KIND:MODEL`, where MODEL is a Hub id or a local folder:

    nearid:Aleksandar/nearid-siglip2                  the NearID embedding (`image_embeds`)
    clip:openai/clip-vit-large-patch14                CLIP's projected image embedding
    dinov2:facebook/dinov2-large                      DINOv2's pooled CLS token
    dinov3:facebook/dinov3-vitl16-pretrain-lvd1689m   DINOv3's pooled CLS token (the backbone of ID-Sim)
    siglip:google/siglip2-so400m-patch14-384          frozen SigLIP2 through its pretrained MAP head
    siglip-mean:google/siglip2-so400m-patch14-384     frozen SigLIP2, mean of the patch tokens

A spec without `KIND:` is a NearID model. Adding a Hugging Face vision model is one entry in
`SCORER_KINDS`: how to load it, which output is the embedding, and its size.

No model repo's code is ever run: a NearID model is loaded by this checkout's own classes from its
configs and safetensors weights (`nearid.loading`), the baselines by transformers' own classes with
`trust_remote_code=False`.

A scorer is an encoder of `nearid.store`: `loader` turns an image into pixels (the one decode, then
the model's own processor), `encode` turns pixels into embeddings, and `fingerprint` keys its store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from nearid.hub_ids import split_revision
from nearid.images import PixelLoader
from nearid.integrity import check_weights
from nearid.loading import ModelSource, has_safetensors, load_nearid
from nearid.numerics import WEIGHT_DTYPES, autocast
from nearid.store.format import StoreFormat, fingerprint, weights_digest

DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPES}


@dataclass(frozen=True)
class ScorerKind:
    model_class: str  # the transformers class that loads it
    features: Callable  # (model, pixel_values) -> [B, D] embedding before normalisation
    dim: Callable  # config -> D


def _pooled(output):
    """transformers 5 returns an output object from get_image_features, 4.x a tensor."""
    return getattr(output, "pooler_output", output)


SCORER_KINDS = {
    "nearid": ScorerKind("NearIDModel", lambda model, pixels: model(pixel_values=pixels).pooler_output,
                         lambda config: config.embed_dim),
    "clip": ScorerKind("CLIPModel", lambda model, pixels: _pooled(model.get_image_features(pixel_values=pixels)),
                       lambda config: config.projection_dim),
    "dinov2": ScorerKind("AutoModel", lambda model, pixels: model(pixel_values=pixels).pooler_output,
                         lambda config: config.hidden_size),
    "dinov3": ScorerKind("AutoModel", lambda model, pixels: model(pixel_values=pixels).pooler_output,
                         lambda config: config.hidden_size),
    "siglip": ScorerKind("SiglipVisionModel", lambda model, pixels: model(pixel_values=pixels).pooler_output,
                         lambda config: config.hidden_size),
    "siglip-mean": ScorerKind("SiglipVisionModel",
                              lambda model, pixels: model(pixel_values=pixels).last_hidden_state.mean(1),
                              lambda config: config.hidden_size),
}


def parse_spec(spec: str) -> tuple:
    """'clip:openai/clip-vit-large-patch14' -> ('clip', 'openai/clip-vit-large-patch14'); no kind -> nearid."""
    kind, sep, model = spec.partition(":")
    if not sep or "/" in kind or kind in ("", ".", ".."):
        return "nearid", spec
    if kind not in SCORER_KINDS:
        raise ValueError(f"unknown scorer kind {kind!r} in {spec!r}: expected KIND:MODEL with KIND one of "
                         f"{sorted(SCORER_KINDS)}, or a NearID model id or folder alone")
    return kind, model


def load_baseline(kind: ScorerKind, folder: Path, dtype):
    """(model, image processor) of a baseline with transformers' own classes; a repo's code is never run."""
    import transformers
    from transformers import AutoImageProcessor

    model = getattr(transformers, kind.model_class).from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                                                      trust_remote_code=False)
    # The PIL backend: torchvision is not required.
    backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return model, AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False, **backend)


def pinned_spec(provenance: dict) -> tuple:
    """(spec, revision) that load the scorer of `provenance` again, from any working folder: a local
    folder by its absolute path, a Hub id at the commit it resolved to (never a relative path, which
    read from another folder could name a Hub repo instead)."""
    if provenance.get("path"):
        return f"{provenance['kind']}:{provenance['path']}", None
    spec, pinned = split_revision(provenance["spec"])  # the commit pins it, not the revision asked for
    return spec, provenance.get("commit") or pinned or provenance.get("revision")


# --------------------------------------------------------------------------------------------------
# The scorer


class Scorer:
    """Images -> L2-normalised float32 embeddings, as an encoder of the embed-once store.

    `mixed_precision` is a resolved autocast precision ("no", "fp16", "bf16"; `nearid.numerics`);
    `compile` runs the embedding through `torch.compile` (values equal to rounding, so the store's
    fingerprint leaves it out).
    """

    def __init__(self, spec: str, revision: str | None = None, device: str = "cpu", dtype=torch.float32,
                 mixed_precision: str = "no", compile: bool = False):
        self.spec = spec
        self.kind_name, model = parse_spec(spec)
        kind = SCORER_KINDS[self.kind_name]
        resolved = ModelSource.parse(model, revision).resolve()  # MODEL@REV, or --revision
        self.model_name, folder, self.commit = resolved.name, resolved.folder, resolved.commit
        self.path = None if self.commit else str(folder.resolve())  # a local folder, wherever the run started
        if self.kind_name == "nearid":
            model, self.processor = load_nearid(folder, dtype, self.model_name, self.commit)
        else:
            if not has_safetensors(folder):
                raise FileNotFoundError(f"{self.model_name} has no safetensors weights (model.safetensors); weights "
                                        "are read only from safetensors, since pickled ones can run code. Give a repo "
                                        "or a local folder with safetensors weights.")
            check_weights(folder)  # a truncated weights file is named, not a raw SafetensorError traceback
            model, self.processor = load_baseline(kind, folder, dtype)
        self.model = model.to(device).eval()
        self.loader = PixelLoader(self.processor)
        self._features = torch.compile(kind.features) if compile else kind.features
        # A revision pins Hub ids only; a local folder ignores it, so it is not recorded.
        self.revision = resolved.provenance()["revision"]
        self.device, self.dtype, self.mixed_precision = device, dtype, mixed_precision
        self.format = StoreFormat((kind.dim(self.model.config),), "float32")
        numerics = {"dtype": str(dtype)}
        if mixed_precision != "no":  # without autocast, the keys of stores built before it existed
            numerics["autocast"] = mixed_precision
        self.fingerprint = fingerprint(f"pooled:{self.kind_name}", weights_digest(self.model.state_dict()),
                                       self.processor.to_dict(), numerics)

    def provenance(self) -> dict:
        return {"spec": self.spec, "kind": self.kind_name, "model": self.model_name, "path": self.path,
                "revision": self.revision, "commit": self.commit, "fingerprint": self.fingerprint,
                "dtype": str(self.dtype).removeprefix("torch."), "mixed_precision": self.mixed_precision,
                "device": str(self.device)}

    def preprocess(self, image) -> torch.Tensor:
        """One image (anything `load_image` takes) -> pixel tensor [C, H, W]."""
        return self.loader.pixels((image, None))

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> L2-normalised float32 embeddings [B, D] on the CPU.

        The pixels are float, or the uint8 codes of `self.loader` (normalised on the device).
        """
        pixels = self.loader.model_input(pixel_values, self.device, self.dtype)
        with autocast(self.device, self.mixed_precision):
            features = self._features(self.model, pixels)
        embeddings = F.normalize(features.float(), dim=-1)
        if not torch.isfinite(embeddings).all():
            raise FloatingPointError(
                f"the scorer {self.spec} produced non-finite embeddings (NaN/inf) on a batch of {len(pixel_values)} "
                "images. Check the weights and dtype (try --dtype float32); no results were written.")
        return embeddings.cpu()


def default_workers() -> int:
    """A DataLoader worker count that leaves a core for the main process."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
