"""What a stored value is and what it depends on: the store key (`fingerprint`) and the storage format.

`fingerprint` keys one way of computing images: a store folder holds values of one fingerprint.
`StoreFormat` is the shape and storage dtype of one stored item, with its int8 quantisation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

FORMAT_VERSION = 2
# Names the rules of the one decode (`load_image` in image_processing_nearid.py): change it with them,
# so that values cached under other rules are never reused. Here, not beside the decode, because a
# store read by a loader worker must not import the image processor (and transformers with it).
DECODE_RULES = "exif-transpose+alpha-on-white+16-bit-scaled/2"
STORAGE_DTYPES = {"float32": "<f4", "float16": "<f2", "int8": "i1"}  # little-endian on every machine


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors`: follows the weights, not their file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(payload: str, weights: str, preprocessing: Mapping, numerics: Mapping) -> str:
    """The store key of one way of computing images: what is computed (`payload`, e.g. "pooled:clip" or
    "tokens"), from which weights (`weights_digest`), with which preprocessing (the processor's
    settings) and decode rules, in which numeric formats (model dtype, autocast, storage dtype)."""
    key = json.dumps({"format": FORMAT_VERSION, "payload": payload, "weights": weights, "decode": DECODE_RULES,
                      "preprocessing": preprocessing, "numerics": numerics}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StoreFormat:
    """What one stored item is: float values of `shape`, kept as `dtype`.

    "int8" is symmetric quantisation along the last axis: `q = round(x / s)`, `s = max|x| / 127` per
    vector (per token), stored as float32 beside the values; each value is off by at most `s / 2`,
    about 0.8% relative error for Gaussian-like tokens. "float16" rounds to ~0.05%; values beyond
    +-65504 are an error. "float32" stores the values as computed.
    """

    shape: tuple
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    @property
    def bytes_per_item(self) -> int:
        values = int(np.prod(self.shape)) * np.dtype(STORAGE_DTYPES[self.dtype]).itemsize
        return values + (int(np.prod(self.shape[:-1])) * 4 if self.dtype == "int8" else 0)

    def fields(self) -> dict:
        """{field: (shape of one item, numpy dtype)} of what is stored per item, besides its key."""
        fields = {"scale": (self.shape[:-1], np.dtype("<f4"))} if self.dtype == "int8" else {}
        return {**fields, "values": (self.shape, np.dtype(STORAGE_DTYPES[self.dtype]))}

    def empty(self, count: int) -> dict:
        """{field: uninitialised numpy array [count, ...]} to read `count` items into."""
        return {name: np.empty((count, *shape), dtype) for name, (shape, dtype) in self.fields().items()}

    def record_dtype(self, key_bytes: int) -> np.dtype:
        return np.dtype([("key", f"S{key_bytes}"), *((name, dtype, shape) for name, (shape, dtype) in
                                                     self.fields().items())])

    def encode(self, values: torch.Tensor) -> dict:
        """values [B, *shape] (any float dtype, any device) -> {field: numpy array} in the storage dtype."""
        values = values.float()
        if tuple(values.shape[1:]) != self.shape:
            raise ValueError(f"computed values have shape {tuple(values.shape[1:])}, the store holds {self.shape}")
        if self.dtype == "int8":
            quantized, scales = quantize_int8(values)
            return {"values": quantized.cpu().numpy(), "scale": scales.cpu().numpy()}
        return {"values": values.to(getattr(torch, self.dtype)).cpu().numpy()}

    def decode(self, fields: Mapping, device=None) -> torch.Tensor:
        """{field: array or tensor} -> float32 tensor [N, *shape] on `device`.

        The stored values travel as they are (half the bytes of float32 for float16, a quarter for
        int8) and are widened on the device; from pinned memory the copy does not block.
        """
        values = _on(fields["values"], device).float()
        if self.dtype == "int8":
            values = values * _on(fields["scale"], device).float()[..., None]
        return values

    def as_meta(self, fingerprint_: str) -> dict:
        return {"format_version": FORMAT_VERSION, "fingerprint": fingerprint_, "shape": list(self.shape),
                "dtype": self.dtype}


def _on(array, device) -> torch.Tensor:
    tensor = torch.as_tensor(array)
    return tensor if device is None else tensor.to(device, non_blocking=True)


def finite_rows(values: torch.Tensor) -> torch.Tensor:
    """[N] bool: which rows of `values` [N, ...] (any float dtype, any device) hold only finite numbers.

    A finite sum means every value is finite (NaN and inf never cancel into a finite number), and
    costs a twentieth of torch.isfinite on a CPU; only a non-finite sum (a bad value, or an overflow
    of the sum) is looked at value by value. The sum of float16 values is taken in float32, where it
    cannot overflow.
    """
    if bool(torch.isfinite(values.sum(dtype=torch.float32))):
        return torch.ones(len(values), dtype=torch.bool, device=values.device)
    return torch.isfinite(values.reshape(len(values), -1)).all(dim=1)


def quantize_int8(values: torch.Tensor):
    """Symmetric int8 along the last axis: values [..., C] -> (int8 [..., C], float32 scales [...])."""
    values = values.float()
    # max |x| as max(max x, -min x): the same number without an |x| copy of the values (5x faster on a CPU);
    # abs() keeps an all-zero vector's scale +0.
    scales = (torch.maximum(values.amax(dim=-1), values.amin(dim=-1).neg()) / 127).abs()
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero vector stays zero
    quantized = values.div(divisor[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return quantized, scales

