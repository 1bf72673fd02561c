"""Building NearID models: the start of training, and SigLIP checkpoint folders for tests.

- `nearid_from_siglip`: NearID in float32 with a frozen backbone and its image processor, from a
  SigLIP checkpoint (the untrained NearID: SigLIP's tower and its pretrained MAP head copied in) or
  from a NearID model (its trained head goes on training), a Hub id or a local folder. Either is
  built by this checkout's classes from configs and safetensors weights; no repo code runs.
- `save_siglip_checkpoint`: a SigLIP vision checkpoint folder like a Hub snapshot (weights plus a
  SigLIP preprocessor config): the stand-in base model of the demo, benchmarks and tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nearid.io import atomic_write_json
from nearid.loading import (
    SIGLIP_TYPES,
    ModelSource,
    ResolvedModel,
    has_safetensors,
    load_nearid,
    model_config,
)


def nearid_from_siglip(base_model, revision: str | None = None):
    """(NearIDModel in float32 with a frozen backbone, NearIDImageProcessor) from a SigLIP checkpoint, or from
    a NearID model to train further: `base_model` is `MODEL[@REV]` (a Hub id or a local folder; `revision`
    pins a Hub id too), or a `ResolvedModel` (`resolve_base_model`), whose files are then read as they are."""
    from image_processing_nearid import NearIDImageProcessor
    from modeling_nearid import NearIDModel

    base = base_model if isinstance(base_model, ResolvedModel) else resolve_base_model(base_model, revision)
    folder, name = base.folder, str(base.source)
    model_type = model_config(folder).get("model_type")
    if model_type == "nearid":
        model, processor = load_nearid(folder, name=base.name, commit=base.commit)
    elif model_type in SIGLIP_TYPES:
        if not has_safetensors(folder):
            raise FileNotFoundError(f"--base-model {name} has no safetensors weights (model.safetensors); "
                                    "pickled weights are not loaded, since they can run code. Give a SigLIP "
                                    "checkpoint with safetensors weights.")
        model = NearIDModel.from_siglip(str(folder), use_safetensors=True)
        processor = NearIDImageProcessor.from_pretrained(str(folder))
    else:
        raise ValueError(f"--base-model {name} is a {model_type!r} checkpoint; training starts from a "
                         "fixed-resolution SigLIP or SigLIP2 checkpoint (model_type 'siglip' or 'siglip_vision_model', "
                         "e.g. google/siglip2-so400m-patch14-384) or from a NearID model (model_type 'nearid').")
    return model.float().freeze_backbone(), processor


def resolve_base_model(base_model: str, revision: str | None = None) -> ResolvedModel:
    """The base model of a training run, `--base-model MODEL[@REV]` (and `--base-revision`), resolved once
    to its folder and commit; errors name the flag."""
    source = ModelSource.parse(base_model, revision, flag="--base-model")
    try:
        return source.resolve()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--base-model {source}: {error}") from None


def save_siglip_checkpoint(folder, vision_config: dict | None = None, model=None, seed: int = 0) -> Path:
    """A SigLIP vision checkpoint folder like a Hub snapshot: weights plus a SigLIP preprocessor config.

    Saves `model` (a transformers SigLIP vision model), or a randomly initialised one built from
    `vision_config` with `seed`: a stand-in base model for training and tests without downloads.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder = Path(folder)
    if model is None:
        torch.manual_seed(seed)
        model = SiglipVisionModel(SiglipVisionConfig(**vision_config))
    model.save_pretrained(folder)
    side = model.config.image_size
    atomic_write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": side, "width": side},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    return folder
