"""The fill's first stage: the images of a store's missing keys, loaded and cut into batches of pixels.

Images are decoded and preprocessed in DataLoader workers. The batches are cut by the caller
before they are shared between processes, so every image meets the same batch mates whatever the
process count (and results are bit-identical). An image that cannot be loaded is reported with its
batch, never raised in a worker, so the main process can name it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def pixel_batches(batches: list, items: Mapping, loader, num_workers: int = 0, pin_memory: bool = False):
    """Iterable of (keys, pixels [B, ...] or None, {key: failure reason}), one per batch of keys in `batches`.

    `loader(items[key])` -> pixels runs in `num_workers` DataLoader workers (0: in this process); a
    batch whose images all failed has pixels None.
    """
    keys = [key for batch in batches for key in batch]
    sizes = np.cumsum([0] + [len(batch) for batch in batches])
    return DataLoader(Items(keys, items, loader), batch_sampler=[list(range(a, b)) for a, b in zip(sizes, sizes[1:])],
                      num_workers=num_workers, collate_fn=Collate(getattr(loader, "collate", torch.stack)),
                      pin_memory=pin_memory)


class Items(Dataset):
    """(key, pixels or None, failure reason or None) per key; loading errors are returned, never raised,
    so a bad image is reported by the main process with its name rather than as a worker traceback."""

    def __init__(self, keys: list, items: Mapping, loader):
        self.keys, self.items, self.loader = keys, items, loader

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        key = self.keys[index]
        try:
            return key, self.loader(self.items[key]), None
        except (ValueError, OSError) as error:  # ImageLoadError, processor errors, unreadable files
            return key, None, str(error)


class Collate:
    """(keys, one batch of pixels or None, {key: failure reason}) of a batch of `Items`; `stack` is the
    loader's own (`PixelLoader.collate`: uint8 codes stay uint8) or torch.stack."""

    def __init__(self, stack):
        self.stack = stack

    def __call__(self, batch):
        good = [(key, pixels) for key, pixels, _ in batch if pixels is not None]
        failed = {key: reason for key, pixels, reason in batch if pixels is None}
        return [key for key, _ in good], self.stack([pixels for _, pixels in good]) if good else None, failed

