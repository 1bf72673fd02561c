"""Images in NearID: the one decode, content keys, pixel loading and image files on disk.

The decode itself (`load_image`) lives in the Hub's `image_processing_nearid.py`, because the image
processor that Hub users load must apply the same rules; this module re-exports it for the
package and adds what only the commands need:

- `content_hash`: the key of an image in every cache, the sha256 of its encoded bytes (nothing is
  decoded), so the same picture is computed once however many times a run uses it;
- `PixelLoader`: decode (`load_image`) then a model's image processor, as DataLoader workers run it;
  pixels cross processes as uint8 and are normalised where the model runs; a padded slot (None)
  gives the all-zero pixels the reference uses;
- `image_suffixes` / `find_images`: the files of a folder that Pillow can decode, and the others
  with the reason they were left out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from image_processing_nearid import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoadError,
    ImageTooLargeError,
    load_image,
    read_image_bytes,
)

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageLoadError", "ImageTooLargeError", "PixelLoader", "content_hash",
           "find_images", "image_suffixes", "load_image"]


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
    """`(ref, where)` -> an image's pixels as they travel from a DataLoader worker to the model.

    With a processor that splits its work in two (`NearIDImageProcessor.pixel_codes` and
    `value_table`), a worker decodes and resizes, and the pixels travel as uint8 codes [3, H, W]
    (0.44 MB at 384 px, a quarter of float32's 1.77 MB, through the worker queues and to the GPU);
    `model_input` rescales and normalises them where the model runs, by a lookup in the processor's
    own table, so the values are bit-identical to the processor's `pixel_values`. Other processors'
    float32 pixels travel as they are.

    None (a padded slot) gives all-zero float pixels, a grey image after normalisation, as the
    reference implementation pads. Picklable, so it runs in DataLoader worker processes.
    """

    def __init__(self, processor, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.processor = processor
        self.max_image_pixels = getattr(processor, "max_image_pixels", max_image_pixels)
        size = getattr(processor, "size", None) or {}
        self.pad_shape = (3, size.get("height", 0), size.get("width", 0))
        self.table = processor.value_table() if hasattr(processor, "pixel_codes") else None
        self._tables = {}  # device -> the table there, flattened

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": {}}

    def __call__(self, item) -> torch.Tensor:
        """One image -> uint8 codes [3, H, W] (float32 pixels for a pad or a processor without codes)."""
        if item is None:
            if not all(self.pad_shape):
                raise ValueError("this image processor has no fixed output size, so a padded slot has no shape")
            return torch.zeros(self.pad_shape)
        ref, where = item
        image = load_image(ref, name=where, max_image_pixels=self.max_image_pixels)
        if self.table is not None:
            codes = self.processor.pixel_codes(image)  # (H, W, 3), read-only: PIL's own memory
            return torch.from_numpy(np.ascontiguousarray(codes.transpose(2, 0, 1)))
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(pixels)[0].float()

    def collate(self, images: list) -> torch.Tensor:
        """What `__call__` gave for each image -> one batch; uint8 unless a float one (a pad) is among them."""
        if not all(image.dtype == torch.uint8 for image in images):
            images = [self.normalise(image[None])[0] if image.dtype == torch.uint8 else image for image in images]
        return _stack(images)

    def model_input(self, batch: torch.Tensor, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """A batch of `collate` (or float pixels) -> the model's float pixels [B, 3, H, W] on `device`, in
        `dtype` (None: float32 for codes, float pixels as given).

        uint8 codes are copied as they are (without blocking, from pinned memory) and normalised on
        the device.
        """
        batch = batch.to(device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = self.normalise(batch)
        return batch if dtype is None else batch.to(dtype)

    def normalise(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes [B, 3, H, W] -> float32 pixels, on their device: table[c][code] per channel."""
        if self.table is None:
            raise ValueError("uint8 pixel codes need an image processor with pixel_codes and value_table "
                             f"(NearIDImageProcessor); {type(self.processor).__name__} gives float pixels")
        device = codes.device
        if device not in self._tables:
            self._tables[device] = self.table.reshape(-1).to(device)
        offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=device).view(1, 3, 1, 1)
        index = (codes.to(torch.int32) + offsets).reshape(-1)
        return torch.index_select(self._tables[device], 0, index).view(codes.shape)

    def pixels(self, item) -> torch.Tensor:
        """One image -> its float32 pixels [3, H, W] on the CPU, equal to the processor's `pixel_values`."""
        return self.model_input(self.collate([self(item)]))[0]


def _stack(images: list) -> torch.Tensor:
    """torch.stack; in a DataLoader worker straight into shared memory, as PyTorch's default collate does,
    so the batch is not copied again to be sent to the main process."""
    if get_worker_info() is None:
        return torch.stack(images)
    first = images[0]
    storage = first.untyped_storage()._new_shared(len(images) * first.numel() * first.element_size())
    out = torch.empty(0, dtype=first.dtype).set_(storage, 0, (len(images), *first.shape))
    return torch.stack(images, out=out)


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
