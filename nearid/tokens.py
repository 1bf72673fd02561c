"""Backbone tokens for training: the frozen backbone run once per image, the head trained on stored tokens.

NearID training freezes the SigLIP backbone and uses no augmentation, so an image's post-LayerNorm
patch tokens (`NearIDModel.forward_features`) are the same at every step of every epoch. They are
the "tokens" payload of the embed-once store (`nearid.store`): computed once, in one batched
no-grad pass, and read back for every step. The price is disk: 729 x 1152 values per so400m image,
1.68 MB in float16 (0.84 MB in int8), so a step of the paper's batch (128 samples x 6 slots) reads
about 1.3 GB. The training input path hides that read behind the step:

- `BackboneTokens`: the store encoder of the tokens (fingerprint, format, pixel loader, encode).
- `TrainingImages`: the images the token store must hold (training and held-out indexes, and the
  padded slot `PAD_KEY`, an all-zero pixel tensor as in the reference).
- `token_loader`: the training DataLoader (accelerate prepares it). Its worker processes read the
  tokens of the next steps (`TokenBatches`) into a ring of shared, page-locked buffers
  (`TokenRing`, its pages mapped by each worker once, at its start) while the current step trains; the step copies its buffer to the GPU without
  blocking and widens it there.
- `CachedTokens` / `BackboneEveryStep`: head inputs for a training batch or a list of image keys,
  from the store or from running the backbone on every slot at every step (the reference design,
  for comparison).
- `head_embeddings`, `batch_embeddings`, `embed_keys`: the head on those inputs, L2-normalised.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nearid.cli import lazy_module
from nearid.io import disk_free_bytes, human_bytes
from nearid.numerics import autocast
from nearid.store.format import StoreFormat, fingerprint, weights_digest
from nearid.training_data import slot_mask

# The loader's worker processes import this module (and nearid.training_data) to read tokens; the
# image processor behind nearid.images, and transformers with it, would cost each spawned worker
# seconds before its first batch, and only the encoder (`BackboneTokens`) needs it.
images = lazy_module("nearid.images")
logger = logging.getLogger(__name__)

PAD_KEY = "pad"
HEAD_PREFIX = "backbone.vision_model.head."
PREFETCH_FACTOR = 2  # batches each loader worker holds or has queued (PyTorch's default)
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


class BackboneTokens:
    """Encoder of the "tokens" payload: pixels -> `model.forward_features` (under autocast when asked).

    `compile` runs the backbone through `torch.compile` (the values agree with eager to rounding, so
    the fingerprint leaves it out); `mixed_precision` is a resolved one ("no", "fp16", "bf16").
    """

    def __init__(self, model, processor, storage_dtype: str = "float16", mixed_precision: str = "no",
                 device="cpu", compile: bool = False):
        self.model, self.device, self.mixed_precision = model, device, mixed_precision
        self.forward = torch.compile(model.forward_features) if compile else model.forward_features
        self.loader = images.PixelLoader(processor)
        self.format = StoreFormat(model.config.token_shape, storage_dtype)
        backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
        # Tokens depend on the backbone weights, the preprocessing and the numeric formats only.
        self.fingerprint = fingerprint("tokens", weights_digest(backbone), processor.to_dict(),
                                       {"storage": storage_dtype, "autocast": mixed_precision})

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            pixels = self.loader.model_input(pixels, self.device)  # uint8 codes are normalised on the device
            with autocast(self.device, self.mixed_precision):
                return self.forward(pixels)
        finally:
            self.model.train(was_training)


class TrainingImages(Mapping):
    """The images to cache: `keys` read lazily from `items` (an index), plus the padded slot (None)."""

    def __init__(self, items: Mapping, keys):
        self.items, self.keys = items, [PAD_KEY, *keys]

    def __getitem__(self, key):
        return None if key == PAD_KEY else self.items[key]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class CachedTokens:
    """Head inputs from the token store; each unique image of a batch is read once (pads cost nothing)."""

    def __init__(self, store, device):
        self.store, self.device = store, torch.device(device)
        self.ring = None

    def tokens(self, keys) -> tuple:
        """Image keys (None = pad) -> (float32 tokens of the unique images, the row of each key); a blocking read."""
        keys = [PAD_KEY if key is None else key for key in keys]
        position = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        tokens = self.store.get(list(position), device=self.device)
        return tokens, torch.tensor([position[key] for key in keys], device=self.device)

    def training_batches(self, images_per_batch: int, buffers: int) -> "TokenBatches":
        """The loader's dataset, reading into a new ring of `buffers` batches of up to `images_per_batch` images."""
        self.ring = TokenRing(self.store.format, buffers, images_per_batch)
        return TokenBatches(self.store, self.ring)

    def batch_tokens(self, batch: dict) -> tuple:
        """A training batch -> (float32 tokens of its unique images on the device, the row of each slot)."""
        if self.device.type == "cuda":
            self.ring.pin()
        return self.widen(self.ring.fields(batch["buffer"], len(batch["keys"])), batch["keys"]), batch["index"]

    def widen(self, fields: dict, keys) -> torch.Tensor:
        """The stored rows of `keys` (`StoreFormat.fields`) -> float32 tokens on the device, checked."""
        tokens = self.store.format.decode(fields, self.device)
        self.store.check_finite(keys, tokens)
        return tokens


class BackboneEveryStep:
    """Head inputs from running the frozen backbone on every slot of every sample (the reference design)."""

    def __init__(self, model, items: Mapping, loader, device):
        self.model, self.items, self.loader, self.device = model, items, loader, device

    def tokens(self, keys) -> tuple:
        batch = self.loader.collate([self.loader(None if key is None else self.items[key]) for key in keys])
        pixels = self.loader.model_input(batch, self.device)
        with torch.no_grad():
            return self.model.forward_features(pixels), torch.arange(len(keys), device=self.device)

    def training_batches(self, images_per_batch: int, buffers: int) -> "TokenBatches":
        return TokenBatches()  # the batches name the images; the backbone computes them in the step

    def batch_tokens(self, batch: dict) -> tuple:
        return self.tokens([key for sample in batch["slots"] for key in sample])


class TokenRing:
    """`size` batch buffers of stored token rows in shared memory, written by loader workers, read by steps.

    The batch of global step s lives in buffer s % size, so no batch is allocated, sent through the
    loader's queues or copied between processes: handing a worker's 1.3 GB batch over as a fresh
    shared-memory tensor costs more than reading it (benchmarks/bench_token_loader.py measures both).
    On a CUDA device the buffers are page-locked, so the copy to the GPU does not block.
    """

    def __init__(self, fmt: StoreFormat, size: int, images: int):
        self.size = size
        check_shared_memory(size * images * fmt.bytes_per_item, size, images)
        self.buffers = {name: _shared_empty((size, images, *shape), _torch_dtype(dtype))
                        for name, (shape, dtype) in fmt.fields().items()}
        self.pinned = False
        self.prefault()  # allocated here, once, so that no worker allocates while the others read

    def __len__(self) -> int:
        return self.size

    def fields(self, buffer: int, count: int) -> dict:
        """{field: tensor view [count, ...]} of the first `count` rows of `buffer`."""
        return {name: tensor[buffer, :count] for name, tensor in self.buffers.items()}

    def prefault(self) -> bool:
        """Map every page of the buffers into this process, writable, before any batch is read into them.

        A process that shares the ring shares its memory but not its page tables (fork copies none for
        shared memory; spawn maps it afresh), so without this each first write of a loader worker to
        one of the ring's 4 KiB pages traps, and the first write of all allocates it: more than the
        read of the tokens itself (benchmarks/bench_token_loader.py). One madvise(MADV_POPULATE_WRITE)
        per buffer maps them in bulk instead, once per process and run, and leaves the contents as
        they are (another worker may already be writing its batch). False where the system cannot
        (before Linux 5.14, not Linux): the pages are then mapped by their first writes, a cost in
        speed only.
        """
        return all(_populate_write(tensor) for tensor in self.buffers.values())

    def pin(self) -> None:
        """Page-lock the buffers for asynchronous copies to the GPU.

        Called with the first batch, once the loader's workers run, so that no worker is forked from
        a process holding page-locked memory. A failure costs speed only, and is said once.
        """
        if self.pinned:
            return
        self.pinned = True
        cudart = torch.cuda.cudart()
        for tensor in self.buffers.values():
            pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
            error = int(cudart.cudaHostRegister(pointer, size, 0))
            if error:
                logger.warning("could not page-lock the token ring (CUDA error %d): copies of cached tokens to the "
                               "GPU will block", error)
                return
            weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)


def _populate_write(tensor: torch.Tensor) -> bool:
    """madvise(MADV_POPULATE_WRITE) over the pages of `tensor`; False where the system does not support it."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    return madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE) == 0


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _shared_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, as PyTorch's own collate allocates batches for workers.

    `torch.empty(...).share_memory_()` would copy the whole buffer (seconds per GB); this maps it
    (`TokenRing.prefault` then allocates its pages in one call).
    """
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def check_shared_memory(needed: int, buffers: int, images: int, folder: str = "/dev/shm") -> None:
    """OSError with the way out when the token ring would not fit in the shared memory of this machine."""
    if not Path(folder).is_dir():  # no /dev/shm (macOS): shared memory is not a separate budget there
        return
    free = disk_free_bytes(folder)
    if needed > free:
        raise OSError(f"the training input path needs {human_bytes(needed)} of shared memory ({buffers} batch "
                      f"buffers of {images} images: 2 per --num-workers worker, plus 2) but {folder} has "
                      f"{human_bytes(free)} free. Lower --num-workers or --per-device-batch-size, store int8 tokens "
                      "(--cache-dtype int8), or give the machine more shared memory (docker: --shm-size).")


class TokenBatches(Dataset):
    """The dataset of the training DataLoader: a `StepBatch` (one process's samples of one step) -> its batch.

    Every batch holds "samples" (sample indices [B]), "mask" ([B, 6], False for a padded slot) and
    "slots" (each sample's 6 image keys, None for a pad). With a store and a ring, the worker also
    reads the tokens of the batch's unique images, each once (every pad is `PAD_KEY`), into ring
    buffer `step % len(ring)`, and the batch adds "buffer", "keys" (those images, in order of first
    use) and "index" ([B * 6], the row of each slot among them).
    """

    def __init__(self, store=None, ring: TokenRing | None = None):
        self.store, self.ring = store, ring

    def __getitems__(self, batch) -> dict:
        out = {"samples": torch.tensor(batch.samples),
               "mask": torch.tensor([slot_mask(sample) for sample in batch.slots]),
               "slots": batch.slots}
        if self.ring is None:
            return out
        keys = [PAD_KEY if key is None else key for sample in batch.slots for key in sample]
        position = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        buffer = batch.step % len(self.ring)
        fields = self.ring.fields(buffer, len(position))
        self.store.read_into(list(position), {name: tensor.numpy() for name, tensor in fields.items()})
        return {**out, "buffer": buffer, "keys": list(position), "index": torch.tensor([position[k] for k in keys])}


def _as_is(batch):
    return batch  # `TokenBatches.__getitems__` builds the whole batch


def _prefault_worker_ring(worker_id: int) -> None:
    """A loader worker's start: the pages of the ring it writes are mapped before its first batch."""
    ring = torch.utils.data.get_worker_info().dataset.ring
    if ring is not None:
        ring.prefault()


def token_loader(provider, sampler, num_workers: int, device) -> DataLoader:
    """The training DataLoader (for accelerate to prepare) of `sampler`'s batches, read ahead by workers.

    `num_workers` processes read the batches of the next steps while a step trains; with 0 the main
    process reads each batch just before its step.
    """
    in_flight = num_workers * PREFETCH_FACTOR
    # While a step trains on its buffer, the loader has handed out at most the next step's batch
    # (accelerate reads one ahead) and has asked its workers for at most `in_flight` more: with
    # in_flight + 2 buffers, no buffer is written while a step still reads it.
    dataset = provider.training_batches(sampler.images_per_batch, in_flight + 2)
    # The workers read every step of the run from one iterator (the sampler spans the run), so each
    # maps the ring's pages once per run, at its start.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_as_is, num_workers=num_workers,
                      prefetch_factor=PREFETCH_FACTOR if num_workers else None,
                      worker_init_fn=_prefault_worker_ring if num_workers else None,
                      pin_memory=torch.device(device).type == "cuda")


def head_embeddings(head, provider, keys) -> torch.Tensor:
    """Image keys (None = pad) -> L2-normalised head embeddings [len(keys), D], in key order."""
    tokens, index = provider.tokens(keys)
    return F.normalize(head(tokens).float(), dim=-1)[index]


def batch_embeddings(head, provider, batch: dict) -> torch.Tensor:
    """A training batch (`TokenBatches`) -> L2-normalised embeddings [B, 6, D] of its samples' slots."""
    tokens, index = provider.batch_tokens(batch)
    return F.normalize(head(tokens).float(), dim=-1)[index].view(*batch["mask"].shape, -1)


def embed_keys(head, provider, keys, batch_size: int = 256) -> dict:
    """{key: normalised embedding} of images through the current head (no grad; for validation)."""
    embeddings = {}
    with torch.no_grad():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            embeddings.update(zip(chunk, head_embeddings(head, provider, chunk).cpu().numpy()))
    return embeddings
