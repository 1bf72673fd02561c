"""How the encoders run on a device, the same way in every command: mixed precision and autocast.

`--mixed-precision auto`, the default of train.py and evaluate.py, is bf16 autocast on a CUDA GPU
and none elsewhere. On a GPU the matrix products then run at bf16 tensor-core speed while the
weights, LayerNorms and softmax stay float32; on a CPU nothing changes (float32, as before).
Attention runs through PyTorch's fused `scaled_dot_product_attention` ("sdpa"), the default of
NearID's model code and of transformers' models.

This module is the one place that decides: `resolve_precision` turns the flag into a precision for the
device a process runs on (train.py's accelerator device, evaluate.py's and search.py's --device), and
`autocast` is the one way into autocast, for the token pass, the scorers and the training step.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

# Names only (torch is imported where it runs), so the commands' flags can list them cheaply.
AUTOCAST = {"no": None, "fp16": "float16", "bf16": "bfloat16"}  # precision -> torch dtype name
PRECISIONS = ("auto", *AUTOCAST)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # dtypes a scorer's weights load in (`--dtype`)


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu; an unavailable device is an error, never a silent fallback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise ValueError(f"--device {device} is not available on this machine (torch {torch.__version__}, CUDA "
                         f"available: {torch.cuda.is_available()}); use --device cpu or auto")
    return device


def resolve_precision(precision: str, device="auto") -> str:
    """The autocast precision of a run on `device` (a torch device, or "auto": the one `resolve_device` picks).

    "auto" -> "bf16" on a CUDA device, "no" elsewhere; "no", "fp16" and "bf16" as they are. train.py
    (on the device its accelerator trains on) and evaluate.py (on --device) both resolve it here."""
    if precision not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import torch

    if device == "auto":
        device = resolve_device(device)
    return "bf16" if torch.device(device).type == "cuda" else "no"


def autocast(device, precision: str):
    """The autocast context of a resolved `precision` on `device`'s type (a null context for "no")."""
    import torch

    dtype = AUTOCAST[precision]
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype)) if dtype else nullcontext()


@contextmanager
def cpu_threads(count: int):
    """torch's CPU ops on `count` threads inside the block, the previous count after it.

    A float sum split over another number of threads adds in another order, so a figure computed on
    the CPU can change in its last digits with the thread count (and a clustering threshold can then
    move an image from one cluster to another)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
