"""Write a complete NearID Hub repo folder: weights, configs and the remote code that loads them.

A folder written here loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)`, locally or after an upload.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_nearid.py", "modeling_nearid.py", "image_processing_nearid.py")
AUTO_MAP = {
    "AutoConfig": "configuration_nearid.NearIDConfig",
    "AutoModel": "modeling_nearid.NearIDModel",
    "AutoImageProcessor": "image_processing_nearid.NearIDImageProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}


def export_hub_folder(model, image_processor, folder, dtype=torch.float16, overwrite=False):
    """Save `model` (weights cast to `dtype`, published key layout) and `image_processor` as a Hub repo.

    The folder is assembled next to its destination and moved into place at the end, so an
    interrupted export never leaves a half-written repo where a complete one is expected.
    Returns the folder path.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} already exists and is not empty. Choose another folder or pass overwrite=True."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_folder(model, image_processor, staging, dtype)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def _write_folder(model, image_processor, folder, dtype):
    original_dtype = model.dtype
    try:
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
    finally:
        model.to(original_dtype)
    image_processor.save_pretrained(folder)
    _patch_json(folder / "config.json", {"auto_map": AUTO_MAP, "architectures": ["NearIDModel"]})
    _patch_json(folder / "preprocessor_config.json", {"auto_map": PROCESSOR_AUTO_MAP})
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REPO_ROOT / name, folder / name)


def _patch_json(path, updates):
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
