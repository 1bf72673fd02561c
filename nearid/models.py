"""Building NearID models: from a SigLIP checkpoint for training, and SigLIP checkpoint folders for tests.

- `nearid_from_siglip`: the untrained NearID (SigLIP's tower and its pretrained MAP head copied in,
  backbone frozen) with the matching NearID image processor, from a Hub id or a local folder.
- `save_siglip_checkpoint`: a SigLIP vision checkpoint folder like a Hub snapshot (weights plus a
  SigLIP preprocessor config): the stand-in base model of the demo, benchmarks and tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nearid.io import atomic_write_json


def nearid_from_siglip(base_model: str, revision: str | None = None):
    """(NearIDModel in float32 with a frozen backbone, NearIDImageProcessor) from a SigLIP checkpoint."""
    from image_processing_nearid import NearIDImageProcessor
    from modeling_nearid import NearIDModel

    pinned = {"revision": revision} if revision else {}
    model = NearIDModel.from_siglip(base_model, **pinned).float().freeze_backbone()
    processor = NearIDImageProcessor.from_pretrained(base_model, **pinned)
    return model, processor


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
