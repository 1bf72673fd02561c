"""Scorers: NearID and the paper's baselines behind one interface (images -> normalised embeddings).

A scorer is named by a spec string `KIND:MODEL`, where MODEL is a Hub id or a local folder:

    nearid:Aleksandar/nearid-siglip2                  the NearID embedding (`image_embeds`)
    clip:openai/clip-vit-large-patch14                CLIP's projected image embedding
    dinov2:facebook/dinov2-large                      DINOv2's pooled CLS token
    siglip:google/siglip2-so400m-patch14-384          frozen SigLIP2 through its pretrained MAP head
    siglip-mean:google/siglip2-so400m-patch14-384     frozen SigLIP2, mean of the patch tokens

A spec without `KIND:` is a NearID model. Adding a Hugging Face vision model is one entry in
`SCORER_KINDS`: how to load it and which output is the embedding.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ScorerKind:
    load: Callable  # (name_or_path, revision, dtype) -> model
    features: Callable  # (model, pixel_values) -> [B, D] embedding before normalisation
    trust_remote_code: bool = False


def _auto_model(class_name, trust_remote_code=False):
    def load(name_or_path, revision, dtype):
        import transformers

        model_class = getattr(transformers, class_name)
        return model_class.from_pretrained(
            name_or_path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
        )

    return load


def _pooled(output):
    """transformers 5 returns an output object from get_image_features, 4.x a tensor."""
    return getattr(output, "pooler_output", output)


SCORER_KINDS = {
    "nearid": ScorerKind(
        _auto_model("AutoModel", trust_remote_code=True),
        lambda model, pixels: model(pixel_values=pixels).pooler_output,
        trust_remote_code=True,
    ),
    "clip": ScorerKind(
        _auto_model("CLIPModel"), lambda model, pixels: _pooled(model.get_image_features(pixel_values=pixels))
    ),
    "dinov2": ScorerKind(_auto_model("AutoModel"), lambda model, pixels: model(pixel_values=pixels).pooler_output),
    "siglip": ScorerKind(
        _auto_model("SiglipVisionModel"), lambda model, pixels: model(pixel_values=pixels).pooler_output
    ),
    "siglip-mean": ScorerKind(
        _auto_model("SiglipVisionModel"), lambda model, pixels: model(pixel_values=pixels).last_hidden_state.mean(1)
    ),
}


def parse_spec(spec: str):
    """'clip:openai/clip-vit-large-patch14' -> ('clip', 'openai/clip-vit-large-patch14'); no kind -> nearid."""
    kind, sep, model = spec.partition(":")
    if not sep or "/" in kind or kind in ("", ".", ".."):
        return "nearid", spec
    if kind not in SCORER_KINDS:
        raise ValueError(
            f"Unknown scorer kind {kind!r} in {spec!r}. Expected KIND:MODEL with KIND one of "
            f"{sorted(SCORER_KINDS)}, or a NearID model id / folder alone."
        )
    return kind, model


def load_image_processor(name_or_path, revision=None, trust_remote_code=False):
    """The model's own image processor, PIL backend (torchvision is not required)."""
    import transformers
    from transformers import AutoImageProcessor

    backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return AutoImageProcessor.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code, **backend
    )


def weights_fingerprint(folder) -> str:
    """sha256 over a local model folder's weight and config files: a cache key that follows the weights."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_model_folder(name_or_path, revision=None):
    """A local folder as is; a Hub id downloaded (or found in the cache) as a snapshot at `revision`.

    The snapshot folder is named by its commit hash, so the resolved revision is known exactly.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path, None
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(name_or_path, revision=revision))
    return folder, folder.name


class Scorer:
    """Turns preprocessed images into L2-normalised embeddings; counts its forward passes."""

    def __init__(self, spec, revision=None, device="cpu", dtype=torch.float32):
        self.spec = spec
        self.kind_name, self.model_name = parse_spec(spec)
        kind = SCORER_KINDS[self.kind_name]
        folder, commit = resolve_model_folder(self.model_name, revision)
        self.model = kind.load(str(folder), None, dtype).to(device).eval()
        self.processor = load_image_processor(str(folder), trust_remote_code=kind.trust_remote_code)
        self._features = kind.features
        self.device, self.dtype = device, dtype
        self.revision = commit or revision
        self.fingerprint = self._fingerprint(folder, commit)
        self.forward_passes = 0
        self.images_embedded = 0

    def _fingerprint(self, folder, commit):
        weights = commit if commit else weights_fingerprint(folder)
        preprocessing = json.dumps(self.processor.to_dict(), sort_keys=True, default=str)
        key = json.dumps([self.kind_name, weights, preprocessing, str(self.dtype)])
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def provenance(self):
        return {
            "spec": self.spec,
            "kind": self.kind_name,
            "model": self.model_name,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def preprocess(self, image):
        """One decoded PIL image -> pixel tensor [C, H, W]."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def embed(self, pixel_values):
        """pixel_values [B, C, H, W] -> L2-normalised float32 embeddings [B, D] on the CPU."""
        self.forward_passes += 1
        self.images_embedded += len(pixel_values)
        features = self._features(self.model, pixel_values.to(self.device, self.dtype))
        embeddings = F.normalize(features.float(), dim=-1)
        if not torch.isfinite(embeddings).all():
            raise FloatingPointError(
                f"Scorer {self.spec} produced non-finite embeddings (NaN/inf) on a batch of {len(pixel_values)} "
                "images. Check the weights and dtype (try dtype float32); no results were written."
            )
        return embeddings.cpu()
