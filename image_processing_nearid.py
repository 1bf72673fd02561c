"""NearID image processor: SigLIP preprocessing, faster, with the same numbers.

NearID was trained with transformers' PIL ("slow") SigLIP processor, so its inputs must match
`SiglipImageProcessorPil` exactly: convert to RGB (transparency composited onto white), resize
with PIL, rescale, normalise. That processor is slow for reasons that do not change the result:
it round-trips every image PIL -> numpy -> PIL -> numpy, rescales in float64 and normalises in
separate passes. This one resizes the same uint8 PIL image with the same PIL call and then maps
each uint8 code through a 256-entry table per channel that was computed with the reference's own
float64/float32 arithmetic, written straight into one preallocated float32 batch tensor (allocated
through numpy, which backs large arrays with huge pages). The output is bit-identical to the
reference and more than twice as fast on one core (benchmarks/bench_image_processor.py).

It also refuses oversized images (decompression bombs) before decoding their pixels, and names
the file when one cannot be read.
"""

from __future__ import annotations

import os
import pathlib
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

# Pillow's default limit, spelled out: Image.MAX_IMAGE_PIXELS is a global other code may change.
DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)

_FILTER_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_CONFIG_KEYS = (
    "do_convert_rgb",
    "do_resize",
    "size",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "max_image_pixels",
)
# Image.MAX_IMAGE_PIXELS is process-global; serialise our brief lifts of it.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An image file exists but PIL cannot decode it (corrupt, truncated or not an image)."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than `max_image_pixels` allows (decompression-bomb guard)."""


def _check_pixels(width: int, height: int, limit: int | None, source: str) -> None:
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"{source} is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{limit:,} (max_image_pixels). Decoding it could exhaust memory (decompression bomb). "
            "If you trust the image, raise the limit, e.g. "
            "NearIDImageProcessor.from_pretrained(..., max_image_pixels=N), or pass "
            "max_image_pixels=None to disable the check."
        )


def _open_lazily(path: str) -> Image.Image:
    """Open `path` reading only its header, whatever Pillow's global limit says."""
    with warnings.catch_warnings():
        # Our own check (with the size and the fix) replaces Pillow's warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            pass
    # Pillow refused before we could read the size; reopen with its limit lifted so that
    # `max_image_pixels` alone decides. Only the header is parsed here, no pixels.
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _load_file(path: str | os.PathLike, limit: int | None) -> Image.Image:
    """Decode a file the way transformers' `load_image` does: EXIF rotation, then plain RGB."""
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"Got the URL {path!r}; this processor does not download. Download it first.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}. Pass an existing file, a PIL image or an array.")
    try:
        with _open_lazily(path) as image:
            _check_pixels(*image.size, limit, f"Image file {path!r}")
            image.load()  # decode inside the try so truncation errors name the file
            # load_image drops alpha with convert("RGB") (no white background); we match it.
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as err:  # Pillow uses all of these
        raise ImageLoadError(
            f"Could not decode image file {path!r}: {err}. The file is corrupt, truncated or not an "
            "image; re-download or re-encode it, or drop it from the inputs."
        ) from err


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for PIL: transparency goes onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    # convert() would return an identical copy; skipping it is the common fast path.
    return image if image.mode == "RGB" else image.convert("RGB")


def _channels_first(shape: tuple[int, ...], input_data_format: str | None) -> bool:
    """Channel axis of a 3-D array, by transformers' rule: ambiguous shapes are channels-first."""
    if input_data_format is not None:
        if input_data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}."
            )
        return input_data_format == "channels_first"
    if shape[0] in (1, 3, 4):
        return True
    if shape[-1] in (1, 3, 4):
        return False
    raise ValueError(
        f"Cannot find the channel axis of an array of shape {shape}: expected 1, 3 or 4 channels "
        "first (C,H,W) or last (H,W,C). Pass a PIL image or an array in one of those layouts."
    )


def _array_to_hwc(array: np.ndarray, input_data_format: str | None) -> np.ndarray:
    """Validate a single uint8 image array and return it as (H, W, C)."""
    if array.dtype != np.uint8:
        raise TypeError(
            f"Image arrays must be uint8 with values 0-255, got dtype {array.dtype}. For floats in "
            "[0, 1] pass (x * 255).round().astype(np.uint8), or pass a PIL image."
        )
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"Expected an image array of shape (H,W), (H,W,C) or (C,H,W), got shape {array.shape}.")
    if _channels_first(array.shape, input_data_format):
        array = np.moveaxis(array, 0, -1)
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected 1, 3 or 4 channels, got an array of shape {array.shape}.")
    return array


def _hwc_to_rgb(array: np.ndarray, do_convert_rgb: bool) -> np.ndarray:
    """convert_to_rgb for arrays: gray is repeated, RGBA is blended onto white in float64."""
    channels = array.shape[-1]
    if channels == 3:
        return array
    if not do_convert_rgb:
        raise ValueError(f"Got a {channels}-channel array with do_convert_rgb=False; pass RGB or enable it.")
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    alpha = array[..., 3:4] / 255
    return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)


def _value_table(cfg: Mapping[str, Any]) -> torch.Tensor:
    """Output value of every uint8 code for each channel, [3, 256] float32.

    Computed with the reference's arithmetic (rescale in float64 then cast to float32, normalise
    in float32), so a lookup is bit-identical to running those ops on every pixel.
    """
    codes = np.arange(256, dtype=np.float64)
    values = (codes * cfg["rescale_factor"]).astype(np.float32) if cfg["do_rescale"] else codes.astype(np.float32)
    values = np.broadcast_to(values, (3, 256))
    if cfg["do_normalize"]:
        mean = np.asarray(cfg["image_mean"], dtype=np.float32)[:, None]
        std = np.asarray(cfg["image_std"], dtype=np.float32)[:, None]
        values = (values - mean) / std
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _new_batch(count: int, height: int, width: int) -> torch.Tensor:
    """An uninitialised float32 [count, 3, H, W] tensor.

    Allocated by numpy because numpy asks Linux for transparent huge pages on large arrays;
    first-touching a 113 MB batch then costs ~4x less than with torch.empty, a sizeable share
    of the whole preprocessing time.
    """
    return torch.from_numpy(np.empty((count, 3, height, width), dtype=np.float32))


def _lookup_into(pixels: np.ndarray, table: torch.Tensor, codes: np.ndarray, out: torch.Tensor) -> None:
    """Write table[c][pixels[..., c]] into out[c] (channel-first) for an (H, W, 3) uint8 image."""
    codes[...] = pixels.transpose(2, 0, 1)  # uint8 HWC -> int32 CHW in one pass: gathers need ints
    flat_codes = torch.from_numpy(codes).view(3, -1)
    for channel in range(3):
        torch.index_select(table[channel], 0, flat_codes[channel], out=out[channel].view(-1))


def _size_dict(size: Any) -> dict[str, int]:
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, Mapping) or not {"height", "width"} <= set(size) or min(size.values()) < 1:
        raise ValueError(
            "size must be a dict of positive 'height' and 'width' (e.g. {'height': 384, 'width': 384}), "
            f"got {size!r}."
        )
    return {"height": int(size["height"]), "width": int(size["width"])}


def _channel_stats(key: str, values: Any) -> list[float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{key} needs 3 values (one per RGB channel), got {values!r}.")
    if key == "image_std" and 0.0 in values:
        raise ValueError(f"image_std must not contain 0 (it divides), got {values}.")
    return values


def _validated(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise config values to plain JSON types and reject bad ones, saying what is allowed."""
    cfg["size"] = _size_dict(cfg["size"])
    if not isinstance(cfg["resample"], int) or int(cfg["resample"]) not in _FILTER_NAMES:
        raise ValueError(f"resample must be a PIL filter number {_FILTER_NAMES}, got {cfg['resample']!r}.")
    cfg["resample"] = int(cfg["resample"])  # a plain int, also when given a PIL enum: it goes to JSON
    cfg["image_mean"] = _channel_stats("image_mean", cfg["image_mean"])
    cfg["image_std"] = _channel_stats("image_std", cfg["image_std"])
    cfg["rescale_factor"] = float(cfg["rescale_factor"])
    limit = cfg["max_image_pixels"]
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"max_image_pixels must be a positive integer or None (no limit), got {limit!r}.")
    cfg["max_image_pixels"] = None if limit is None else int(limit)
    return cfg


def _as_items(images: Any) -> list[Any]:
    """A flat list of single images; 4-D arrays/tensors count as batches."""
    if isinstance(images, (list, tuple)):
        return [item for image in images for item in _as_items(image)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


class NearIDImageProcessor(BaseImageProcessor):
    r"""SigLIP preprocessing for NearID: RGB, resize (aspect not kept), rescale, normalise.

    Gives the same `pixel_values` as transformers' `SiglipImageProcessorPil` with the same
    settings. Inputs: PIL images, uint8 arrays or tensors ((H,W), (H,W,C) or (C,H,W)), or file
    paths, alone or in a list of mixed kinds and sizes. Files are decoded as transformers'
    `load_image` does (EXIF rotation applied, then `convert("RGB")`, which drops alpha rather than
    compositing it), so a path gives what the reference gives for the same path.

    Args:
        do_convert_rgb: convert to RGB, compositing transparency onto white.
        do_resize: resize to `size`.
        size: `{"height": h, "width": w}` output size.
        resample: PIL filter number (2 bilinear for SigLIP2 fixed-resolution, 3 bicubic for SigLIP).
        do_rescale / rescale_factor: multiply pixels by `rescale_factor` (1/255).
        do_normalize / image_mean / image_std: `(x - mean) / std` per channel.
        max_image_pixels: refuse images with more pixels than this before decoding; None disables.
    """

    model_input_names = ["pixel_values"]
    # A class default lets to_dict keep an explicit max_image_pixels=None ("no limit").
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(
        self,
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        cfg = {
            "do_convert_rgb": bool(do_convert_rgb),
            "do_resize": bool(do_resize),
            "size": size if size is not None else {"height": 384, "width": 384},
            "resample": resample,
            "do_rescale": bool(do_rescale),
            "rescale_factor": rescale_factor,
            "do_normalize": bool(do_normalize),
            "image_mean": image_mean,
            "image_std": image_std,
            "max_image_pixels": max_image_pixels,
        }
        # Plain attributes: BaseImageProcessor.to_dict/from_dict save and load them as they are.
        for key, value in _validated(cfg).items():
            setattr(self, key, value)

    def __call__(self, images: Any, return_tensors: str | None = "pt", **overrides) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        input_data_format: str | None = None,
        **overrides,
    ) -> BatchFeature:
        """Preprocess one image or a list into `BatchFeature({"pixel_values": float32 [B,3,H,W]})`.

        `overrides` replace config values for this call (e.g. `resample=3`).
        `input_data_format` ("channels_first"/"channels_last") settles ambiguous array layouts.
        `return_tensors`: "pt" (or None) for a torch tensor, "np" for a numpy array.
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        cfg = self._settings(overrides)
        items = _as_items(images)
        if not items:
            raise ValueError("Got no images: pass one image or a non-empty list of images.")
        pixel_values = self._fill_batch(items, cfg, input_data_format)
        return BatchFeature({"pixel_values": pixel_values.numpy() if return_tensors == "np" else pixel_values})

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(_CONFIG_KEYS))
        if unknown:
            raise TypeError(f"Unknown preprocess option(s) {unknown}; valid options are {list(_CONFIG_KEYS)}.")
        cfg = {key: getattr(self, key) for key in _CONFIG_KEYS}
        cfg.update(overrides)
        return _validated(cfg)  # attributes may have been reassigned since __init__

    def _fill_batch(self, items: list[Any], cfg: dict[str, Any], input_data_format: str | None) -> torch.Tensor:
        """Decode, resize and normalise one image at a time into a preallocated batch."""
        table = _value_table(cfg)
        batch = codes = None
        for index, item in enumerate(items):
            image = self._to_rgb_image(item, index, cfg, input_data_format)
            if cfg["do_resize"]:
                image = image.resize((cfg["size"]["width"], cfg["size"]["height"]), resample=cfg["resample"])
            pixels = np.asarray(image)  # (H, W, 3) uint8
            if batch is None:
                batch = _new_batch(len(items), *pixels.shape[:2])
                codes = np.empty((3, *pixels.shape[:2]), dtype=np.int32)
            elif pixels.shape[:2] != codes.shape[1:]:
                raise ValueError(
                    f"With do_resize=False all images must have one size: image 0 is {codes.shape[1:]} "
                    f"(H, W), image {index} is {pixels.shape[:2]}. Enable do_resize or batch by size."
                )
            _lookup_into(pixels, table, codes, batch[index])
        return batch

    def _to_rgb_image(self, item: Any, index: int, cfg: dict[str, Any], input_data_format: str | None) -> Image.Image:
        """Any supported input -> RGB PIL image, as the reference converts it before resizing."""
        limit = cfg["max_image_pixels"]
        if isinstance(item, (str, pathlib.PurePath)):
            return _load_file(item, limit)
        if isinstance(item, Image.Image):
            _check_pixels(*item.size, limit, f"Image {index} (PIL, mode {item.mode})")
            if cfg["do_convert_rgb"]:
                return _pil_to_rgb(item)
            if item.mode != "RGB":
                raise ValueError(
                    f"Image {index} has mode {item.mode!r} and do_convert_rgb=False; pass RGB or enable it."
                )
            return item
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if isinstance(item, np.ndarray):
            array = _array_to_hwc(item, input_data_format)
            _check_pixels(array.shape[1], array.shape[0], limit, f"Image {index} (array of shape {item.shape})")
            return Image.fromarray(np.ascontiguousarray(_hwc_to_rgb(array, cfg["do_convert_rgb"])))
        raise TypeError(
            f"Image {index} has unsupported type {type(item).__name__}; expected a PIL image, a uint8 "
            "numpy array or torch tensor, or a file path (str or pathlib.Path)."
        )


__all__ = ["NearIDImageProcessor", "ImageLoadError", "ImageTooLargeError", "DEFAULT_MAX_IMAGE_PIXELS"]
