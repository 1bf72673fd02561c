"""Embed each unique image once per run, and never again: an on-disk cache and a batched embedder.

Images are identified by the sha256 of their encoded bytes, so the same picture used by several
sources, pairs or metrics is decoded, preprocessed and embedded once. Embeddings are stored per
scorer fingerprint (weights, preprocessing, dtype), so a second run of the same evaluation
performs zero forward passes. With several processes (`accelerate launch`), the images that miss
the cache are split between processes and the embeddings gathered, so every process ends with
the same table as a single process would.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class EmbeddingCache:
    """Append-only store of {image hash: embedding} for one scorer fingerprint.

    Layout: `<root>/<fingerprint>/shard-<n>.npz`, each holding `keys` and `vectors`. A shard is
    written to a temporary file and renamed, so an interrupted run leaves only complete shards.
    """

    def __init__(self, root, fingerprint):
        self.folder = Path(root) / fingerprint if root else None
        self._table = self._load() if self.folder else {}

    def _load(self):
        table = {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard) as data:
                table.update(zip(data["keys"].tolist(), data["vectors"]))
        return table

    def __contains__(self, key):
        return key in self._table

    def __len__(self):
        return len(self._table)

    def get(self, key):
        return self._table[key]

    def add(self, embeddings: dict, persist=True):
        """Store new embeddings in memory and, with a cache folder and `persist`, as one new shard."""
        new = {k: v for k, v in embeddings.items() if k not in self._table}
        self._table.update(new)
        if not new or self.folder is None or not persist:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(new), dtype=str)
        vectors = np.stack([np.asarray(v, dtype=np.float32) for v in new.values()])
        handle, temp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, keys=keys, vectors=vectors)
        os.replace(temp, self.folder / f"shard-{len(list(self.folder.glob('shard-*.npz'))):05d}-{os.getpid()}.npz")


class _ImageItems(Dataset):
    """Decode + preprocess one image per item (in DataLoader workers); failures are returned, not raised."""

    def __init__(self, items, decode, preprocess, skip_errors):
        self.items, self.decode, self.preprocess, self.skip_errors = items, decode, preprocess, skip_errors

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        key, ref = self.items[index]
        try:
            return key, self.preprocess(self.decode(ref)), None
        except ValueError as error:  # ImageReadError and processor errors are ValueErrors
            if not self.skip_errors:
                raise
            return key, None, str(error)


def _collate(batch):
    good = [(key, pixels) for key, pixels, _ in batch if pixels is not None]
    failed = [(key, reason) for key, pixels, reason in batch if pixels is None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [k for k, _ in good], pixels, failed


def embed_missing(scorer, refs: dict, cache: EmbeddingCache, decode, batch_size=32, num_workers=0,
                  skip_errors=False, state=None, progress=True):
    """Embed every image in `refs` ({hash: ref}) that the cache lacks; return {hash: reason} of skipped ones.

    `decode(ref)` turns a reference into a PIL image (raising ValueError naming the image on
    failure). `state` is an accelerate `PartialState`; with several processes each embeds a share
    and all processes receive all embeddings, all skipped images, and scorer counters
    (`forward_passes`, `images_embedded`) that count the work of every process.

    The missing images are cut into batches *before* they are shared out, so every image is
    embedded in the same batch whatever the number of processes: a CPU matmul's rounding depends on
    the batch it runs in, and this keeps the embeddings of a multi-process run bit-identical to a
    single process's.
    """
    missing = sorted((k, v) for k, v in refs.items() if k not in cache)  # the same order on every process
    batches = [missing[start:start + batch_size] for start in range(0, len(missing), batch_size)]
    if state is not None and state.num_processes > 1:
        embedded, skipped = _embed_shared(scorer, batches, decode, num_workers, skip_errors, progress, state)
    else:
        embedded, skipped = _embed(scorer, batches, decode, num_workers, skip_errors, progress)
    cache.add(embedded, persist=state is None or state.is_main_process)  # one writer
    return skipped


def _embed(scorer, batches, decode, num_workers, skip_errors, progress):
    from tqdm.auto import tqdm

    items, batch_indices = [], []
    for batch in batches:
        batch_indices.append(list(range(len(items), len(items) + len(batch))))
        items.extend(batch)
    loader = DataLoader(
        _ImageItems(items, decode, scorer.preprocess, skip_errors),
        batch_sampler=batch_indices,  # the given batches, whatever their sizes
        num_workers=num_workers,
        collate_fn=_collate,
    )
    embedded, skipped = {}, {}
    with tqdm(total=len(items), desc=f"embedding ({scorer.kind_name})", unit="img", disable=not progress or not items) as bar:
        for keys, pixels, failed in loader:
            skipped.update(failed)
            if pixels is not None:
                embedded.update(zip(keys, scorer.embed(pixels).numpy()))
            bar.update(len(keys) + len(failed))
    return embedded, skipped


def _embed_shared(scorer, batches, decode, num_workers, skip_errors, progress, state):
    """`_embed` of this process's share of `batches`, then every process's results merged."""
    from accelerate.utils import gather_object

    passes, images = scorer.forward_passes, scorer.images_embedded
    with state.split_between_processes(batches) as share:
        embedded, skipped = _embed(scorer, share, decode, num_workers, skip_errors,
                                   progress and state.is_main_process)
    work = (scorer.forward_passes - passes, scorer.images_embedded - images)
    parts = gather_object([(embedded, skipped, work)])
    merged_embedded, merged_skipped = {}, {}
    for part_embedded, part_skipped, _ in parts:
        merged_embedded.update(part_embedded)
        merged_skipped.update(part_skipped)
    # The run's stats then read the same as a single process's, whichever process reports them.
    scorer.forward_passes = passes + sum(part_work[0] for _, _, part_work in parts)
    scorer.images_embedded = images + sum(part_work[1] for _, _, part_work in parts)
    return merged_embedded, merged_skipped


def embedding_matrix(cache, keys, dim):
    """Stack embeddings for `keys` (None -> a zero row and mask False): ([len, dim] float32, [len] bool)."""
    matrix = np.zeros((len(keys), dim), dtype=np.float32)
    present = np.zeros(len(keys), dtype=bool)
    for row, key in enumerate(keys):
        if key is not None and key in cache:
            matrix[row] = cache.get(key)
            present[row] = True
    return matrix, present


def slot_embeddings(cache, slot_keys, dim):
    """Per-slot key lists -> ([rows, slots, dim] float32 embeddings, [rows, slots] presence)."""
    columns = [embedding_matrix(cache, keys, dim) for keys in slot_keys]
    return np.stack([m for m, _ in columns], axis=1), np.stack([p for _, p in columns], axis=1)
