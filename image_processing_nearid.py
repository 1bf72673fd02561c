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

Every image input goes through one decode, `load_image`, also used by the NearID package for
evaluation, training and search, so the same file gives the same pixels however it enters:

- encoded images (a file path, bytes, a `datasets` image dict) are decoded with their EXIF
  orientation applied, as a phone or camera displays them;
- a PIL image handed in is used as given (no EXIF rotation: the caller decoded it);
- transparency (RGBA, LA, a palette or grayscale image with a transparent colour) is composited
  onto white, and every other mode (P, L, 1, CMYK, I;16, ...) is converted with PIL's RGB rule;
- the pixel count is checked before any pixel is decoded (decompression bombs), without touching
  Pillow's process-wide limit;
- errors name the image: the file, or the place the caller gives (dataset, row and column).

- 16-bit grayscale images (modes I;16, I;16B, ...) are scaled to 8 bits (value / 257, rounded), as
  image viewers show them. PIL's own RGB conversion, which transformers uses, clips them at 255 and
  turns a typical 16-bit photo almost white; this is the one place NearID's pixels differ from it.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
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
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_OBJECT_ADDRESS = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")  # e.g. "<_io.BytesIO object at 0x7f..>"


class ImageLoadError(ValueError):
    """An image file exists but PIL cannot decode it (corrupt, truncated or not an image)."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than `max_image_pixels` allows (decompression-bomb guard)."""


def _check_pixels(width: int, height: int, limit: int | None, source: str) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"{source} is {width}x{height}: it has no pixels. Pass an image of at least 1x1.")
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"{source} is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{limit:,} (max_image_pixels). Decoding it could exhaust memory (decompression bomb). "
            "If you trust the image, raise the limit, e.g. "
            "NearIDImageProcessor.from_pretrained(..., max_image_pixels=N), or pass "
            "max_image_pixels=None to leave the check to Pillow's own limit."
        )


def read_image_bytes(image: Any, name: str) -> bytes:
    """The encoded bytes of a path, bytes or `datasets` image dict (nothing is decoded).

    Raises FileNotFoundError for a missing file and ImageLoadError, naming `name`, for anything else
    that cannot be read.
    """
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            return bytes(image["bytes"])
        if not image.get("path"):
            raise ImageLoadError(f"{name} has neither bytes nor a path: nothing to decode.")
        image = image["path"]
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    path = os.fspath(image)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"Got the URL {path!r}; NearID does not download images. Download it first.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such image file {path!r}. Pass an existing file, a PIL image or an array.")
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as err:
        raise ImageLoadError(f"{name}: cannot read image file {path!r} ({err.strerror or err}).") from None


def _decode(data: bytes, name: str, limit: int | None) -> Image.Image:
    """Decode encoded bytes: size check from the header first, then pixels, then EXIF orientation."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(*image.size, limit, name)
            image.load()  # decode inside the try so truncation errors name the image
            return ImageOps.exif_transpose(image)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as err:
        # Pillow's own process-wide limit (Image.MAX_IMAGE_PIXELS) refused it; that setting is the
        # caller's to change, not ours, so say which limit it is.
        raise ImageTooLargeError(
            f"{name} is refused by Pillow's process-wide decompression-bomb limit ({err}). If you trust the "
            "image, raise PIL.Image.MAX_IMAGE_PIXELS in your program, and max_image_pixels if needed."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError) as err:  # Pillow uses all of these
        detail = _OBJECT_ADDRESS.sub("", str(err))  # the same bad image gives the same message in every run
        raise ImageLoadError(
            f"Could not decode {name} ({len(data)} bytes): {detail}. The data is corrupt, truncated or not an "
            "image; re-encode or replace it, or leave it out."
        ) from err


def _describe(image: Any, index: int | None = None) -> str:
    """How errors name an image the caller did not name."""
    if isinstance(image, (str, pathlib.PurePath)):
        return f"image file {os.fspath(image)!r}"
    if isinstance(image, Mapping) and not image.get("bytes") and image.get("path"):
        return f"image file {image['path']!r}"
    prefix = "image" if index is None else f"image {index}"
    if isinstance(image, Image.Image):
        return f"{prefix} (PIL, mode {image.mode}, {image.size[0]}x{image.size[1]})"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"{prefix} (array of shape {tuple(image.shape)})"
    return f"{prefix} ({type(image).__name__})"


# The NearID package's caches name the rules of this decode (nearid.store.format.DECODE_RULES): a change of
# them changes that name, so that cached values never mix rules.
def load_image(
    image: Any,
    name: str | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    input_data_format: str | None = None,
    do_convert_rgb: bool = True,
) -> Image.Image:
    """Turn any image input into an RGB PIL image: the one decode of NearID (see the module docstring).

    Args:
        image: a file path (str or pathlib.Path), encoded bytes, a `datasets` image dict
            `{"bytes": ..., "path": ...}`, a PIL image, or a uint8 array / tensor of shape (H, W),
            (H, W, C) or (C, H, W).
        name: how errors name the image, e.g. "positives row 12 column img2"; default: the file or
            a short description.
        max_image_pixels: refuse images with more pixels than this, before decoding them; None: no
            limit of our own (Pillow's process-wide limit still applies to encoded images).
        input_data_format: "channels_first" or "channels_last" for 3-D arrays whose layout is ambiguous.
        do_convert_rgb: False refuses non-RGB inputs instead of converting them.
    """
    name = name or _describe(image)
    if isinstance(image, (str, pathlib.PurePath, bytes, bytearray, memoryview, Mapping)):
        decoded = _decode(read_image_bytes(image, name), name, max_image_pixels)
    elif isinstance(image, Image.Image):
        _check_pixels(*image.size, max_image_pixels, name)
        decoded = image
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        array = _array_to_hwc(array, input_data_format, name)
        _check_pixels(array.shape[1], array.shape[0], max_image_pixels, name)
        return Image.fromarray(np.ascontiguousarray(_hwc_to_rgb(array, do_convert_rgb)))
    else:
        raise TypeError(
            f"{name} has unsupported type {type(image).__name__}; expected a file path (str or pathlib.Path), "
            "encoded bytes, a datasets image dict, a PIL image, or a uint8 numpy array or torch tensor."
        )
    if not do_convert_rgb:
        if decoded.mode != "RGB":
            raise ValueError(f"{name} has mode {decoded.mode!r} and do_convert_rgb=False; pass RGB or enable it.")
        return decoded
    return _pil_to_rgb(decoded)


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L" (value / 257, rounded: 65535 -> 255); others unchanged."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    scaled = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
    if image.info.get("transparency") is not None:  # a transparent grey value scales with the pixels
        scaled.info["transparency"] = round(image.info["transparency"] / 257)
    return scaled


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for PIL: transparency goes onto white; 16-bit images are
    scaled to 8 bits first (`_to_8_bits`)."""
    image = _to_8_bits(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    # convert() would return an identical copy; skipping it is the common fast path.
    return image if image.mode == "RGB" else image.convert("RGB")


def _channels_first(shape: tuple[int, ...], input_data_format: str | None, name: str) -> bool:
    """Channel axis of a 3-D array, by transformers' rule: ambiguous shapes are channels-first (with a warning)."""
    if input_data_format is not None:
        if input_data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}."
            )
        return input_data_format == "channels_first"
    first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
    if first and last:
        warnings.warn(
            f"{name}: the channel axis is ambiguous (both the first and the last axis could hold channels); "
            "reading it as channels first (C, H, W), as transformers does. Pass "
            "input_data_format='channels_last' (or 'channels_first') to say which.",
            UserWarning,
            stacklevel=4,
        )
    if first or last:
        return first
    raise ValueError(
        f"Cannot find the channel axis of {name}: expected 1, 3 or 4 channels "
        "first (C,H,W) or last (H,W,C). Pass a PIL image or an array in one of those layouts."
    )


def _array_to_hwc(array: np.ndarray, input_data_format: str | None, name: str) -> np.ndarray:
    """Validate a single uint8 image array and return it as (H, W, C)."""
    if array.dtype != np.uint8:
        raise TypeError(
            f"{name}: image arrays must be uint8 with values 0-255, got dtype {array.dtype}. For floats in "
            "[0, 1] pass (x * 255).round().astype(np.uint8), or pass a PIL image."
        )
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"Expected an image array of shape (H,W), (H,W,C) or (C,H,W), got shape {array.shape}.")
    if _channels_first(array.shape, input_data_format, name):
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


def _resized_codes(image: Image.Image, cfg: Mapping[str, Any]) -> np.ndarray:
    """RGB image -> (H, W, 3) uint8, resized with PIL when `do_resize`."""
    if cfg["do_resize"]:
        image = image.resize((cfg["size"]["width"], cfg["size"]["height"]), resample=cfg["resample"])
    return np.asarray(image)


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
    settings on PIL images and arrays. Inputs: PIL images, uint8 arrays or tensors ((H,W), (H,W,C)
    or (C,H,W)), file paths, encoded bytes or `datasets` image dicts, alone or in a list of mixed
    kinds and sizes, all decoded by `load_image`: EXIF orientation applied to files and bytes,
    transparency composited onto white (for files too, where transformers' `load_image` would drop
    the alpha channel), so a file and the PIL image a viewer shows for it give the same pixels.

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

    def pixel_codes(self, image: Image.Image, **overrides) -> np.ndarray:
        """An RGB PIL image (from `load_image`) -> its resized uint8 codes (H, W, 3), before rescale and normalise.

        With `value_table`, the two halves of `preprocess`: `value_table()[c][codes[..., c]]` is
        bit-identical to `pixel_values`, so pixels can travel as uint8 (a quarter of the bytes) and
        be normalised where they are used (nearid.images.PixelLoader).
        """
        return _resized_codes(image, self._settings(overrides))

    def value_table(self, **overrides) -> torch.Tensor:
        """[3, 256] float32: the output value of every uint8 code per channel (rescale and normalise)."""
        return _value_table(self._settings(overrides))

    def _fill_batch(self, items: list[Any], cfg: dict[str, Any], input_data_format: str | None) -> torch.Tensor:
        """Decode, resize and normalise one image at a time into a preallocated batch."""
        table = _value_table(cfg)
        batch = codes = None
        for index, item in enumerate(items):
            pixels = _resized_codes(self._to_rgb_image(item, index, cfg, input_data_format), cfg)
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
        """Any supported input -> RGB PIL image, through the one decode (`load_image`)."""
        return load_image(item, _describe(item, index), cfg["max_image_pixels"], input_data_format, cfg["do_convert_rgb"])


__all__ = ["NearIDImageProcessor", "load_image", "read_image_bytes", "ImageLoadError", "ImageTooLargeError",
           "DEFAULT_MAX_IMAGE_PIXELS"]
