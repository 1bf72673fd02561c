"""Images in NearID: the one decode, content keys, pixel loading and image files on disk.

The decode itself (`load_image`) lives in the Hub's `image_processing_nearid.py`, because the image
processor that Hub users load must apply the same rules; this module re-exports it for the
package and adds what only the commands need:

- `content_hash`: the key of an image in every cache, the sha256 of its encoded bytes (nothing is
  decoded), so the same picture is computed once however many times a run uses it;
- `PixelLoader`: decode (`load_image`) then a model's image processor, as DataLoader workers run it;
  a padded slot (None) gives the all-zero pixels the reference uses;
- `image_suffixes` / `find_images`: the files of a folder that Pillow can decode, and the others
  with the reason they were left out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from image_processing_nearid import (
    DECODE_RULES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoadError,
    ImageTooLargeError,
    load_image,
    read_image_bytes,
)

__all__ = ["DECODE_RULES", "DEFAULT_MAX_IMAGE_PIXELS", "ImageLoadError", "ImageTooLargeError", "PixelLoader",
           "content_hash", "find_images", "image_suffixes", "load_image"]


def content_hash(ref: Any, where: str = "image") -> str:
    """sha256 hex digest of the encoded image (a file is read; nothing is decoded).

    Raises ImageLoadError naming `where` when there is nothing to read (a missing or unreadable file).
    """
    if ref is None:
        raise ValueError(f"{where} is missing (None) and has no content to hash")
    try:
        return hashlib.sha256(read_image_bytes(ref, where)).hexdigest()
    except FileNotFoundError as error:
        raise ImageLoadError(str(error)) from None


class PixelLoader:
    """`(ref, where)` -> pixel tensor [3, H, W]: `load_image`, then the model's image processor.

    None (a padded slot) gives all-zero pixels, a grey image after normalisation, as the reference
    implementation pads. Picklable, so it runs in DataLoader worker processes.
    """

    def __init__(self, processor, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.processor = processor
        self.max_image_pixels = getattr(processor, "max_image_pixels", max_image_pixels)
        size = getattr(processor, "size", None) or {}
        self.pad_shape = (3, size.get("height", 0), size.get("width", 0))

    def __call__(self, item) -> torch.Tensor:
        if item is None:
            if not all(self.pad_shape):
                raise ValueError("this image processor has no fixed output size, so a padded slot has no shape")
            return torch.zeros(self.pad_shape)
        ref, where = item
        image = load_image(ref, name=where, max_image_pixels=self.max_image_pixels)
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(pixels)[0].float()


def image_suffixes() -> frozenset:
    """Lower-case file suffixes (".png", ".jpg", ".gif", ".tiff", ...) of every format Pillow can decode."""
    Image.init()
    return frozenset(suffix.lower() for suffix, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def find_images(folder, recursive: bool = True) -> tuple[list, list]:
    """(image files, [(other file, reason)]) under `folder`, each list sorted by path.

    Image files are those with a suffix Pillow decodes (`image_suffixes`); hidden files (".name")
    are left out silently, every other file is returned with the reason it was left out, and so are
    links to nothing and links to folders (which are not followed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder {folder}; expected a folder of images")
    suffixes = image_suffixes()
    images, others = [], []
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_symlink() and not path.is_file():
            others.append((path, link_problem(path)))
        elif not path.is_file():
            continue
        elif path.suffix.lower() in suffixes:
            images.append(path)
        else:
            others.append((path, f"not an image format Pillow reads (suffix {path.suffix or 'none'!r})"))
    return images, others


def link_problem(path: Path) -> str:
    """Why the link `path` gives no image file: it points at nothing, or at a folder."""
    target = os.readlink(path)
    if path.is_dir():
        return f"a link to the folder {target}; links to folders are not followed (give the folder itself)"
    return f"a link to {target}, which does not exist"
