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

Remote code: a NearID repo ships its model code, which transformers runs with
`trust_remote_code=True`. That is granted only to repos whose `config.json` says
`model_type: nearid`, checked on the config file alone before any code is loaded; any other repo
needs the explicit `trust_remote_code=True` (`--trust-remote-code`). The baselines load with
transformers' own classes and never run repo code.

A scorer is an encoder of `nearid.store`: `loader` turns an image into pixels (the one decode, then
the model's own processor), `encode` turns pixels into embeddings, and `fingerprint` keys its store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from nearid.images import PixelLoader
from nearid.numerics import WEIGHT_DTYPES, autocast
from nearid.store import StoreFormat, fingerprint, weights_digest

DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPES}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ScorerKind:
    model_class: str  # the transformers class that loads it
    features: Callable  # (model, pixel_values) -> [B, D] embedding before normalisation
    dim: Callable  # config -> D


def _pooled(output):
    """transformers 5 returns an output object from get_image_features, 4.x a tensor."""
    return getattr(output, "pooler_output", output)


SCORER_KINDS = {
    "nearid": ScorerKind("AutoModel", lambda model, pixels: model(pixel_values=pixels).pooler_output,
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


# --------------------------------------------------------------------------------------------------
# Finding a model: a local folder or a Hub snapshot, with errors that say which it was


def resolve_model_folder(name_or_path: str, revision: str | None = None) -> tuple:
    """(local folder, commit hash or None): a folder as is; a Hub id downloaded (or from the cache).

    The snapshot folder of a Hub download is named by its commit hash, so the revision that was
    actually used is known exactly, whatever branch or tag was asked for.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision:
            raise ValueError(f"--revision {revision} applies to Hub ids, but {name_or_path} is a local folder; "
                             "drop --revision or give the Hub id")
        return path, None
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such folder {name_or_path!r} (looked for {path.resolve()}), and it is not a Hub "
                                "model id (owner/name). Check the path.")
    folder = _download(name_or_path, revision, path)
    return folder, folder.name


def _download(repo_id: str, revision: str | None, local: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_local = f"There is no local folder {str(local)!r} either."
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"cannot download the model {repo_id!r}: the Hugging Face Hub is not reachable (or HF_HUB_OFFLINE=1 is "
            f"set) and it is not in the local cache. {not_local} Pass a local folder with the model files, or "
            "download it where the Hub is reachable and run with HF_HUB_OFFLINE=1.") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hub model {repo_id!r} has no revision {revision!r}; give a branch, tag or "
                                "commit hash that exists") from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise FileNotFoundError(f"the Hub has no model {repo_id!r} (or it is private: log in with `hf auth login`). "
                                f"{not_local} Check the id or the path.") from None


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse to run a repo's code unless its config says NearID, or the user opted in; say what is missing."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a model folder; give a NearID model "
                                "exported by train.py or nearid.hub.export_hub_folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "nearid" and not trust_remote_code:
        raise ValueError(
            f"{folder} is not a NearID model (config.json has model_type {config.get('model_type')!r}, not 'nearid'), "
            "so its code is not run. Give a NearID model, a baseline as KIND:MODEL, or pass --trust-remote-code if "
            "you trust this repo's code.")
    if "AutoModel" not in config.get("auto_map", {}):
        raise ValueError(
            f"{config_path} has no auto_map entry for AutoModel, so transformers cannot find the NearID model code. "
            "A NearID folder needs auto_map {\"AutoConfig\": \"configuration_nearid.NearIDConfig\", \"AutoModel\": "
            "\"modeling_nearid.NearIDModel\"} and the three *_nearid.py files; re-export it with "
            "nearid.hub.export_hub_folder.")


def load_image_processor(folder, trust_remote_code: bool = False):
    """The model's own image processor, PIL backend (torchvision is not required)."""
    import transformers
    from transformers import AutoImageProcessor

    backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **backend)


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu; an unavailable device is an error, never a silent fallback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise ValueError(f"--device {device} is not available on this machine (torch {torch.__version__}, CUDA "
                         f"available: {torch.cuda.is_available()}); use --device cpu or auto")
    return device


# --------------------------------------------------------------------------------------------------
# The scorer


class Scorer:
    """Images -> L2-normalised float32 embeddings, as an encoder of the embed-once store.

    `mixed_precision` is a resolved autocast precision ("no", "fp16", "bf16"; `nearid.numerics`);
    `compile` runs the embedding through `torch.compile` (values equal to rounding, so the store's
    fingerprint leaves it out).
    """

    def __init__(self, spec: str, revision: str | None = None, device: str = "cpu", dtype=torch.float32,
                 trust_remote_code: bool = False, mixed_precision: str = "no",
                 compile: bool = False):
        import transformers

        self.spec = spec
        self.kind_name, self.model_name = parse_spec(spec)
        kind = SCORER_KINDS[self.kind_name]
        folder, self.commit = resolve_model_folder(self.model_name, revision)
        remote = self.kind_name == "nearid"
        if remote:
            check_remote_code(folder, trust_remote_code)
        model_class = getattr(transformers, kind.model_class)
        self.model = model_class.from_pretrained(str(folder), dtype=dtype, trust_remote_code=remote).to(device).eval()
        self.processor = load_image_processor(folder, trust_remote_code=remote)
        self.loader = PixelLoader(self.processor)
        self._features = torch.compile(kind.features) if compile else kind.features
        self.device, self.dtype, self.revision, self.mixed_precision = device, dtype, revision, mixed_precision
        self.format = StoreFormat((kind.dim(self.model.config),), "float32")
        numerics = {"dtype": str(dtype)}
        if mixed_precision != "no":  # without autocast, the keys of stores built before it existed
            numerics["autocast"] = mixed_precision
        self.fingerprint = fingerprint(f"pooled:{self.kind_name}", weights_digest(self.model.state_dict()),
                                       self.processor.to_dict(), numerics)

    def provenance(self) -> dict:
        return {"spec": self.spec, "kind": self.kind_name, "model": self.model_name,
                "revision": self.revision, "commit": self.commit, "fingerprint": self.fingerprint,
                "dtype": str(self.dtype).removeprefix("torch."), "mixed_precision": self.mixed_precision,
                "device": str(self.device)}

    def preprocess(self, image) -> torch.Tensor:
        """One image (anything `load_image` takes) -> pixel tensor [C, H, W]."""
        return self.loader((image, None))

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> L2-normalised float32 embeddings [B, D] on the CPU."""
        with autocast(self.device, self.mixed_precision):
            features = self._features(self.model, pixel_values.to(self.device, self.dtype, non_blocking=True))
        embeddings = F.normalize(features.float(), dim=-1)
        if not torch.isfinite(embeddings).all():
            raise FloatingPointError(
                f"the scorer {self.spec} produced non-finite embeddings (NaN/inf) on a batch of {len(pixel_values)} "
                "images. Check the weights and dtype (try --dtype float32); no results were written.")
        return embeddings.cpu()


def default_workers() -> int:
    """A DataLoader worker count that leaves a core for the main process."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
