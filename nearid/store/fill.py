"""Filling a store: compute what the store of a fingerprint lacks, in stages reader -> encoder -> writer.

`fill` takes the store root and the fingerprint; it owns the layout under the root
(`layout.store_folder`). The main process takes the folder's lock, drops leftovers of interrupted
fills and verifies every shard on disk; every process then computes its share of the missing
images (`nearid.store.reader` loads them, the caller's encoder computes them, a
`nearid.store.writer.BackgroundWriter` writes them beside the encoder), and the main process indexes
the shards.
"""

from __future__ import annotations

import errno
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

import torch

from nearid.cli import lazy_module
from nearid.io import atomic_write_json, disk_free_bytes, human_bytes, read_json
from nearid.locking import one_writer
from nearid.store.embedding_store import EmbeddingStore
from nearid.store.format import StoreFormat
from nearid.store.layout import (
    INDEX_FILE,
    LOCK_FILE,
    META_FILE,
    check_fingerprint,
    check_format,
    index_shards,
    read_meta,
    store_folder,
    write_index,
)
from nearid.store.reader import pixel_batches
from nearid.store.writer import BackgroundWriter, ShardWriter

# Loaded to raise ImageLoadError: nearid.images brings transformers (seconds), which a fill with its own loader
# and encoder never needs.
images = lazy_module("nearid.images")

REPORT_PREFIX = "report-p"  # report-p<process>.json: what each process computed, merged into the index

DISK_OPTIONS = ("store fewer bytes per image (int8 is half of float16), compute fewer images (fewer sources or "
                "rows), or put the store on a larger disk")


class NotEnoughDiskSpace(OSError):
    """A store would not fit on the disk that holds its folder."""


class Encoder(Protocol):
    """What `fill` computes with: pixels of a batch -> values [B, *shape] (any float dtype, any device)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...


@dataclass
class FillOptions:
    """How `fill` runs; none of these change the stored values."""

    batch_size: int = 32
    num_workers: int = 0
    skip_errors: bool = False
    shard_size: int = 1024
    progress: bool = True
    description: str = "embedding"
    device: str = "cpu"
    disk_options: str = DISK_OPTIONS  # what a run that does not fit on the disk can do instead

    def __post_init__(self):
        for name, low in (("batch_size", 1), ("shard_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class FillReport:
    """What one `fill` computed, over all processes: a warm store reports zero images and passes."""

    skipped: dict = field(default_factory=dict)  # key -> reason
    images_computed: int = 0
    forward_passes: int = 0


def fill(root, fingerprint_: str, fmt: StoreFormat, items: Mapping, loader, encoder: Encoder,
         options: FillOptions | None = None, state=None) -> tuple[EmbeddingStore, FillReport]:
    """Compute every item of `items` the store of `fingerprint_` under `root` lacks; return the store and
    what was done.

    Args:
        root: the store root (created if needed); the values of `fingerprint_` live in a folder of
            their own under it (`layout.store_folder`), so one root serves every model and format.
        fingerprint_: the store key of the values computed (`nearid.store.format.fingerprint`).
        items: {key: item}, equal images under one key; `loader(item)` -> pixels [C, H, W] runs in
            DataLoader workers (an `ImageIndex` and a `nearid.images.PixelLoader`, or any picklable pair).
        encoder: computes a batch of pixels on `options.device`.
        state: an accelerate `PartialState` when several processes fill together (the root must be
            on storage they all see); None for this process alone.

    An item that cannot be loaded stops the fill with ImageLoadError naming it (every process stops
    with the same error), or with `options.skip_errors` is left out and reported in `skipped`. Rows
    already computed are kept either way.
    """
    options = options or FillOptions()
    folder, state = store_folder(root, fingerprint_), state if state is not None else _OneProcess()
    with ExitStack() as lock:
        if state.is_main_process:  # for every process of this run: one run at a time fills a store
            folder.mkdir(parents=True, exist_ok=True)
            lock.enter_context(one_writer(folder / LOCK_FILE, f"the embedding store in {folder}"))
            _prepare(folder, fmt, fingerprint_)
        report = _fill_locked(folder, fingerprint_, fmt, items, loader, encoder, options, state)
    store = EmbeddingStore.open(root, fingerprint_, verify=False)  # every shard was verified while indexing
    if report.skipped and not options.skip_errors:
        first = sorted(report.skipped)[0]
        raise images.ImageLoadError(report.skipped[first] + (f" ({len(report.skipped) - 1} more unreadable images)"
                                                      if len(report.skipped) > 1 else ""))
    return store, report


def _fill_locked(folder: Path, fingerprint_: str, fmt: StoreFormat, items: Mapping, loader, encoder: Encoder,
                 options: FillOptions, state) -> FillReport:
    """The part of `fill` done under the store's lock, once the main process has prepared the folder."""
    state.wait_for_everyone()
    _check_meta(folder, fingerprint_, fmt)  # every process checks the same file, so an error stops all of them
    cached = {key for _, keys in index_shards(read_json(folder / INDEX_FILE, "store index")) for key in keys}
    missing = sorted(key for key in items if key not in cached)  # the same order on every process
    check_free_space(folder, len(missing) * fmt.bytes_per_item, f"{len(missing)} images", options.disk_options)
    batches = [missing[start:start + options.batch_size] for start in range(0, len(missing), options.batch_size)]
    state.wait_for_everyone()  # everyone listed the store before anyone adds to it
    with state.split_between_processes(batches) as share:
        report, written = _compute(folder, fmt, share, items, loader, encoder, options, state)
    atomic_write_json(folder / f"{REPORT_PREFIX}{state.process_index:03d}.json", {**report.__dict__, "shards": written})
    state.wait_for_everyone()
    if state.is_main_process:
        # The shards indexed by _prepare were verified there; those this fill wrote were checksummed as written.
        report, written = _merge_reports(folder)
        write_index(folder, fmt, verify_known=False, last_fill=report.__dict__, written=written)
    state.wait_for_everyone()
    return FillReport(**read_json(folder / INDEX_FILE, "store index")["last_fill"])


def _compute(folder: Path, fmt: StoreFormat, batches: list, items: Mapping, loader, encoder: Encoder,
             options: FillOptions, state) -> tuple[FillReport, list]:
    """This process's share, through the stages: load (reader, in workers) -> encode -> write (writer thread).

    Returns what it did and the index entries of the shards it wrote.
    """
    from tqdm.auto import tqdm

    keys = [key for batch in batches for key in batch]
    reader = pixel_batches(batches, items, loader, options.num_workers,
                           pin_memory=torch.device(options.device).type == "cuda")
    report = FillReport()
    shards = ShardWriter(folder, fmt, state.process_index, options.shard_size, keys)
    writer = BackgroundWriter(shards)
    progress = options.progress and state.is_main_process and bool(keys)
    try:
        with torch.inference_mode(), tqdm(total=len(keys), desc=options.description, unit="img",
                                          disable=not progress) as bar:
            for batch_keys, pixels, failed in reader:
                report.skipped.update(failed)
                if failed and not options.skip_errors and state.num_processes == 1:
                    break  # alone: stop at once (rows computed so far are kept)
                if batch_keys:
                    writer.add(batch_keys, encoder.encode(pixels.to(options.device, non_blocking=True)))
                    report.images_computed += len(batch_keys)
                    report.forward_passes += 1
                bar.update(len(batch_keys) + len(failed))
    finally:
        writer.close()  # also when interrupted: the rows already computed are kept for the next fill
    return report, shards.written


def _prepare(folder: Path, fmt: StoreFormat, fingerprint_: str) -> None:
    """Create the folder and store.json; drop leftovers of interrupted fills; index every sound shard."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in [*folder.glob(".*.tmp"), *folder.glob(f"{REPORT_PREFIX}*.json")]:
        leftover.unlink(missing_ok=True)
    if read_meta(folder) is None:
        atomic_write_json(folder / META_FILE, fmt.as_meta(fingerprint_))
    _check_meta(folder, fingerprint_, fmt)
    write_index(folder, fmt, verify_known=True, last_fill=FillReport().__dict__)


def _check_meta(folder: Path, fingerprint_: str, fmt: StoreFormat) -> None:
    meta = read_meta(folder)
    check_fingerprint(meta, fingerprint_, folder)
    check_format(meta, fmt, folder)


def _merge_reports(folder: Path) -> tuple[FillReport, list]:
    """The processes' reports of this fill as one, and the shards they wrote; their files removed."""
    merged, written = FillReport(), []
    for path in sorted(folder.glob(f"{REPORT_PREFIX}*.json")):
        report = read_json(path, "fill report")
        merged.skipped.update(report["skipped"])
        merged.images_computed += report["images_computed"]
        merged.forward_passes += report["forward_passes"]
        written += report["shards"]
        path.unlink()
    return merged, written


class _OneProcess:
    """The parts of accelerate's PartialState that `fill` uses, for this process alone."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass

    @contextmanager
    def split_between_processes(self, inputs):
        yield inputs


def check_free_space(folder, needed_bytes: int, what: str, options: str = DISK_OPTIONS) -> None:
    """NotEnoughDiskSpace, naming the `options`, when the disk holding `folder` has less than `needed_bytes` free."""
    free = disk_free_bytes(folder)
    if needed_bytes > free:
        raise NotEnoughDiskSpace(
            errno.ENOSPC,
            f"The store in {folder} needs {human_bytes(needed_bytes)} for {what} but the disk has {human_bytes(free)} "
            f"free; nothing was computed. Options: {options}.")
