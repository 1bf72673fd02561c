"""The embed-once store: every unique image computed once, kept on disk, reused by every later run.

One mechanism serves two payloads:

- pooled embeddings [D] of a scorer (evaluation, scoring, search), stored as float32;
- backbone tokens [T, C] of NearID's frozen backbone (training: the backbone never changes, so its
  tokens are computed once and every epoch trains the head on them), stored as float16, int8 or
  float32. so400m tokens are 729 x 1152 values: 1.68 MB per image in float16.

The pieces:

- `ImageIndex`: the unique images of a run, keyed by content (`nearid.images.content_hash`), with
  where each was first seen (a file, or dataset/row/column) for reading and for error messages.
- `fingerprint`: one key of everything a stored value depends on (the weights that compute it, the
  preprocessing, the decode rules, the numeric formats). A store folder holds one fingerprint.
- `fill`: compute what a store folder lacks. Images are decoded and preprocessed in DataLoader
  workers, cut into batches before they are shared between processes (so every image meets the
  same batch mates whatever the process count, and results are bit-identical), computed, and
  written as shards by a thread beside the forward (a bounded queue between them), so a fill takes
  the longer of its forwards and its writes, not their sum. Shards are written to a temporary name
  and renamed, so an interrupted build keeps every finished shard and the next build computes only
  the rest.
- `EmbeddingStore`: the read view, memory-mapped; what it reads is checked (shape, dtype, finite
  values) and a damaged shard is named.

Every shard carries the checksum of its bytes in its name (`nearid.integrity`), taken when it is
written; each fill verifies every shard before it trusts it, and drops (with a warning naming it)
and computes again any shard that is truncated, of another layout, or of other content, including
finite values changed by bit rot or a bad copy. One fill at a time writes to a store folder: a
second run that shares the folder (the same --cache-dir) waits for the first, then computes only
what the first left undone (`nearid.locking`).

Layout of a store folder:

    store.json                  fingerprint, payload shape and storage dtype (written first)
    shard-p<P>-<N>-<XXH>.npy    numpy record arrays (key, [scale,] values), written by process P;
                                XXH is the XXH3-128 checksum of the file
    index.json                  the shards and their keys, and the last build's report (written last)
    store.lock                  held by the run filling the store (store.lock.owner.json says which)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nearid.images import DECODE_RULES, ImageLoadError, content_hash
from nearid.integrity import checksum_file
from nearid.io import atomic_write_json, disk_free_bytes, human_bytes, read_json
from nearid.locking import one_writer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
META_FILE = "store.json"
INDEX_FILE = "index.json"
STORAGE_DTYPES = {"float32": "<f4", "float16": "<f2", "int8": "i1"}  # little-endian on every machine
LOCK_FILE = "store.lock"
# shard-p<process>-<number>-<checksum>.npy; shards written before checksums have no checksum part.
_SHARD_NAME = re.compile(r"shard-p(\d+)-(\d+)(?:-([0-9a-f]{32}))?\.npy")


DISK_OPTIONS = ("store fewer bytes per image (int8 is half of float16), compute fewer images (fewer sources or "
                "rows), or put the store on a larger disk")


class NotEnoughDiskSpace(OSError):
    """A store would not fit on the disk that holds its folder."""


class StoreMismatchError(ValueError):
    """The store folder was built for another fingerprint or payload format."""


class StoreCorruptError(ValueError):
    """A shard of a store is damaged (truncated, wrong layout, or non-finite values)."""


# --------------------------------------------------------------------------------------------------
# The unique images of a run


class ImageIndex(Mapping):
    """Read-only `{image key: (encoded ref, where)}` of the images a run uses, keyed by content.

    Only the place of each image is kept (a file path, or dataset/row/column); its encoded bytes are
    read on access, so the index stays small however large the images are. An image whose bytes
    occur in several places is listed once, at the first place seen. Images that cannot be read at
    all (a missing file) are errors, or with `skip_errors` absent (key None) and listed in
    `unreadable` as `{where: reason}`.
    """

    def __init__(self, skip_errors: bool = False):
        self.skip_errors = skip_errors
        self._columns = {}  # (dataset name, column) -> undecoded one-column Dataset
        self._places = {}  # key -> ("file", path) | ("memory", i) | (dataset name, row, column)
        self._memory = []  # images handed in by the caller, by position
        self.unreadable = {}

    def add_column(self, dataset_name: str, dataset, column: str, rows: Sequence[int] | None = None) -> list:
        """Hash `column` at `rows` (default all) and register each image; one key per row, None where missing."""
        from nearid.data.readers import undecoded

        part = undecoded(dataset.select_columns([column]), [column])
        self._columns[(dataset_name, column)] = part
        rows = range(len(part)) if rows is None else rows
        keys = []
        for start in range(0, len(rows), 256):  # one Arrow slice per chunk, bounded memory
            chunk = list(rows[start:start + 256])
            for row, ref in zip(chunk, part[chunk][column]):
                place = (dataset_name, row, column)
                keys.append(None if ref is None else self._register(place, _plain_ref(ref)))
        return keys

    def add_files(self, paths: Sequence) -> list:
        """Hash image files and register each; one key per path (None for an unreadable one with `skip_errors`)."""
        return [self._register(("file", str(path)), {"bytes": None, "path": str(path)}) for path in paths]

    def add_images(self, images: Sequence) -> list:
        """Register images given in memory (PIL images, arrays, encoded bytes); one key per image.

        Encoded bytes get the key of a file with those bytes; a decoded image is keyed by its pixels.
        """
        keys = []
        for image in images:
            place = ("memory", len(self._memory))
            self._memory.append(image)
            keys.append(self._register(place, image))
        return keys

    def _register(self, place: tuple, ref):
        where = _where(place)
        try:
            key = content_hash(ref, where) if place[0] != "memory" else _memory_key(ref, where)
        except ImageLoadError as error:
            if not self.skip_errors:
                raise
            self.unreadable[where] = str(error)
            return None
        self._places.setdefault(key, place)
        return key

    def where(self, key: str) -> str:
        """Where the image was first seen, e.g. "positives row 3 column img2" or "image file 'a.png'"."""
        return _where(self._places[key])

    def retain(self, keys) -> None:
        """Forget every image not in `keys`."""
        self._places = {key: place for key, place in self._places.items() if key in keys}

    def __getitem__(self, key: str) -> tuple:
        place = self._places[key]
        if place[0] == "file":
            return {"bytes": None, "path": place[1]}, _where(place)
        if place[0] == "memory":
            return self._memory[place[1]], _where(place)
        name, row, column = place
        return _plain_ref(self._columns[(name, column)][row][column]), _where(place)

    def __iter__(self):
        return iter(self._places)

    def __len__(self) -> int:
        return len(self._places)

    def __contains__(self, key) -> bool:  # Mapping's default would read the image
        return key in self._places


def _plain_ref(ref) -> dict:
    return {"bytes": ref.get("bytes"), "path": ref.get("path")}


def _memory_key(image, where: str) -> str:
    """The key of an image given in memory: encoded bytes as a file's, decoded pixels by their values."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return content_hash(bytes(image), where)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        header = f"array|{image.dtype}|{image.shape}"
        data = np.ascontiguousarray(image).tobytes()
    elif hasattr(image, "tobytes") and hasattr(image, "mode"):  # a PIL image
        header = f"pil|{image.mode}|{image.size}|{image.info.get('transparency')}"
        data = image.tobytes()
    else:
        return content_hash(image, where)  # a path or a datasets image dict
    return hashlib.sha256(header.encode() + data).hexdigest()


def _where(place: tuple) -> str:
    if place[0] == "file":
        return f"image file {place[1]!r}"
    if place[0] == "memory":
        return f"image {place[1]} (given in memory)"
    name, row, column = place
    return f"{name} row {row} column {column}"


# --------------------------------------------------------------------------------------------------
# Fingerprints and formats


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


def quantize_int8(values: torch.Tensor):
    """Symmetric int8 along the last axis: values [..., C] -> (int8 [..., C], float32 scales [...])."""
    values = values.float()
    scales = values.abs().amax(dim=-1) / 127
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero vector stays zero
    quantized = torch.round(values / divisor[..., None]).clamp_(-127, 127).to(torch.int8)
    return quantized, scales


# --------------------------------------------------------------------------------------------------
# Reading a store


class EmbeddingStore:
    """Read view of a store folder: `get(keys)` -> float32 [len(keys), *shape], checked as it is read.

    Shards are memory-mapped, and each read copies only the rows asked for, in file order. A store
    can be sent to DataLoader worker processes: it travels as its folder and index, and each process
    maps the shards again (a pickled memory map would travel as a full copy of its file).
    """

    def __init__(self, folder, fingerprint_: str, fmt: StoreFormat, shards: Sequence[tuple]):
        self.folder, self.fingerprint, self.format = Path(folder), fingerprint_, fmt
        self._names = [name for name, _ in shards]
        self._shards = self._map_shards()
        self._location = {}
        for shard_id, (_, keys) in enumerate(shards):
            for row, key in enumerate(keys):
                self._location.setdefault(key, (shard_id, row))

    def _map_shards(self) -> list:
        """Per shard, {field: its column of the memory-mapped records} (views, nothing is read)."""
        records = [_map_shard(self.folder / name, self.format) for name in self._names]
        return [{field: shard[field].view(np.ndarray) for field in self.format.fields()} for shard in records]

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_shards"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._shards = self._map_shards()

    @classmethod
    def open(cls, folder, fingerprint_: str | None = None, verify: bool = True) -> "EmbeddingStore":
        """Open a built store; StoreMismatchError for another fingerprint, StoreCorruptError naming a damaged
        shard (`verify`: every shard's checksum is checked first; `fill` has just checked them)."""
        folder = Path(folder)
        meta = _read_meta(folder)
        if meta is None:
            raise FileNotFoundError(f"no embedding store in {folder} ({META_FILE} is missing); build one first")
        if fingerprint_ is not None:
            _check_fingerprint(meta, fingerprint_, folder)
        if not (folder / INDEX_FILE).exists():
            raise FileNotFoundError(f"the store in {folder} has no {INDEX_FILE}: its build did not finish. Run the "
                                    "same command again; it keeps the finished shards and computes only the rest.")
        index = read_json(folder / INDEX_FILE, "store index")
        if verify:
            for name, _ in _index_shards(index):
                _verify_shard(folder / name)
        return cls(folder, meta["fingerprint"], _format_from_meta(meta, folder), _index_shards(index))

    @property
    def shape(self) -> tuple:
        return self.format.shape

    def __contains__(self, key) -> bool:
        return key in self._location

    def __len__(self) -> int:
        return len(self._location)

    def keys(self) -> list:
        return list(self._location)

    def get(self, keys: Sequence[str], device=None) -> torch.Tensor:
        """float32 values [len(keys), *shape] on `device` (default CPU), in key order."""
        fields = self.format.empty(len(keys))
        self.read_into(keys, fields)
        values = self.format.decode(fields, device)
        self.check_finite(keys, values)
        return values

    def read_into(self, keys: Sequence[str], fields: Mapping) -> None:
        """Copy the stored rows of `keys`, as stored (`StoreFormat.fields`), into `fields[name][:len(keys)]`.

        Each row is copied once, straight from the mapped file into its place, shard by shard in
        file order so that a cold read stays sequential. Nothing is checked here: `check_finite`
        checks the decoded values (on the device, where they are cheap to check).
        """
        try:
            locations = [self._location[key] for key in keys]
        except KeyError as error:
            raise KeyError(f"image {error.args[0]!r} is not in the store at {self.folder} ({len(self)} images); "
                           "fill the store with every image the run uses") from None
        for position in sorted(range(len(keys)), key=locations.__getitem__):
            shard_id, row = locations[position]
            for name, out in fields.items():
                out[position] = self._shards[shard_id][name][row]

    def numpy(self, keys: Sequence[str]) -> np.ndarray:
        """`get` as a float32 numpy array on the CPU."""
        return self.get(keys).numpy()

    def check_finite(self, keys: Sequence[str], values: torch.Tensor) -> None:
        """StoreCorruptError naming the shard when decoded `values` [len(keys), ...] hold NaN or inf."""
        # A finite sum means every value is finite (NaN and inf never cancel into a finite number), and
        # costs a twentieth of torch.isfinite on a CPU; only a non-finite sum (a bad value, or an
        # overflow of the sum) is looked at value by value.
        if bool(torch.isfinite(values.sum())):
            return
        finite = torch.isfinite(values.reshape(len(keys), -1)).all(dim=1)
        if bool(finite.all()):
            return
        bad = int(torch.nonzero(~finite)[0])
        shard = self.folder / self._names[self._location[keys[bad]][0]]
        raise StoreCorruptError(
            f"the store shard {shard} holds non-finite values (NaN or inf) for image {keys[bad]!r}: the file is "
            "damaged. Delete it and run the command again; only the images in that shard are computed again.")


def _verify_shard(path: Path) -> None:
    """StoreCorruptError naming the shard when its bytes differ from the checksum in its name."""
    recorded = _SHARD_NAME.fullmatch(path.name).group(3)
    if recorded is None or not path.is_file():
        return  # written before checksums (checked when a fill indexes it), or missing (`_map_shard` says so)
    if checksum_file(path) != recorded:
        raise StoreCorruptError(f"the store shard {path} does not match the checksum recorded when it was written: "
                                "its bytes changed since (bit rot, a bad copy, or an edit). Run the command again: it "
                                "drops the shard and computes its images again.")


def _map_shard(path: Path, fmt: StoreFormat) -> np.ndarray:
    """Memory-map one shard, checking its layout; StoreCorruptError naming the file otherwise."""
    try:
        records = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise StoreCorruptError(f"the store shard {path} listed in {path.parent / INDEX_FILE} is missing. Delete "
                                f"{path.parent / INDEX_FILE} and run the command again to rebuild the index.") from None
    except (ValueError, OSError, EOFError) as error:  # truncated or garbled header/data
        raise StoreCorruptError(f"the store shard {path} cannot be read ({error}): the file is damaged (truncated?). "
                                "Delete it and run the command again; only its images are computed again.") from None
    expected = fmt.record_dtype(1)
    layout_ok = (records.dtype.names == expected.names and records.ndim == 1
                 and all(records.dtype[name] == expected[name] for name in expected.names if name != "key"))
    if not layout_ok:
        raise StoreCorruptError(f"the store shard {path} holds {records.dtype} records, not the store's {fmt}: the "
                                "file does not belong here. Delete it and run the command again.")
    return records


# --------------------------------------------------------------------------------------------------
# Filling a store


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


def fill(folder, fingerprint_: str, fmt: StoreFormat, items: Mapping, loader, encoder: Encoder,
         options: FillOptions | None = None, state=None) -> tuple[EmbeddingStore, FillReport]:
    """Compute every item of `items` the store at `folder` lacks; return the store and what was done.

    Args:
        folder: the store folder (created if needed); it holds one fingerprint.
        items: {key: item}, equal images under one key; `loader(item)` -> pixels [C, H, W] runs in
            DataLoader workers (an `ImageIndex` and a `nearid.images.PixelLoader`, or any picklable pair).
        encoder: computes a batch of pixels on `options.device`.
        state: an accelerate `PartialState` when several processes fill together (the folder must be
            on storage they all see); None for this process alone.

    An item that cannot be loaded stops the fill with ImageLoadError naming it (every process stops
    with the same error), or with `options.skip_errors` is left out and reported in `skipped`. Rows
    already computed are kept either way.
    """
    options = options or FillOptions()
    folder, state = Path(folder), state if state is not None else _OneProcess()
    with ExitStack() as lock:
        if state.is_main_process:  # for every process of this run: one run at a time fills a store
            folder.mkdir(parents=True, exist_ok=True)
            lock.enter_context(one_writer(folder / LOCK_FILE, f"the embedding store in {folder}"))
            _prepare(folder, fmt, fingerprint_)
        report = _fill_locked(folder, fingerprint_, fmt, items, loader, encoder, options, state)
    store = EmbeddingStore.open(folder, fingerprint_, verify=False)  # every shard was verified while indexing
    if report.skipped and not options.skip_errors:
        first = sorted(report.skipped)[0]
        raise ImageLoadError(report.skipped[first] + (f" ({len(report.skipped) - 1} more unreadable images)"
                                                      if len(report.skipped) > 1 else ""))
    return store, report


def _fill_locked(folder: Path, fingerprint_: str, fmt: StoreFormat, items: Mapping, loader, encoder: Encoder,
                 options: FillOptions, state) -> FillReport:
    """The part of `fill` done under the store's lock, once the main process has prepared the folder."""
    state.wait_for_everyone()
    meta = _read_meta(folder)  # every process checks the same file, so an error stops all of them
    _check_fingerprint(meta, fingerprint_, folder)
    _check_format(meta, fmt, folder)
    cached = {key for _, keys in _index_shards(read_json(folder / INDEX_FILE, "store index")) for key in keys}
    missing = sorted(key for key in items if key not in cached)  # the same order on every process
    check_free_space(folder, len(missing) * fmt.bytes_per_item, f"{len(missing)} images", options.disk_options)
    batches = [missing[start:start + options.batch_size] for start in range(0, len(missing), options.batch_size)]
    state.wait_for_everyone()  # everyone listed the store before anyone adds to it
    with state.split_between_processes(batches) as share:
        report = _compute(folder, fmt, share, items, loader, encoder, options, state)
    atomic_write_json(folder / f"report-p{state.process_index:03d}.json", report.__dict__)
    state.wait_for_everyone()
    if state.is_main_process:
        _write_index(folder, fmt, verify_known=False)  # the shards indexed by _prepare were verified there
    state.wait_for_everyone()
    return FillReport(**read_json(folder / INDEX_FILE, "store index")["last_fill"])


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


def _prepare(folder: Path, fmt: StoreFormat, fingerprint_: str) -> None:
    """Create the folder and store.json; drop leftovers of interrupted fills; index every sound shard."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in [*folder.glob(".*.tmp"), *folder.glob("report-p*.json")]:
        leftover.unlink(missing_ok=True)
    if _read_meta(folder) is None:
        atomic_write_json(folder / META_FILE, fmt.as_meta(fingerprint_))
    meta = _read_meta(folder)
    _check_fingerprint(meta, fingerprint_, folder)
    _check_format(meta, fmt, folder)
    _write_index(folder, fmt, verify_known=True)


def _read_meta(folder: Path):
    path = folder / META_FILE
    return read_json(path, "store description") if path.exists() else None


def _format_from_meta(meta: dict, folder: Path) -> StoreFormat:
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreMismatchError(f"the store in {folder} has format version {meta.get('format_version')}; this "
                                 f"code reads version {FORMAT_VERSION}. Delete the folder to rebuild it.")
    return StoreFormat(tuple(meta["shape"]), meta["dtype"])


def _check_fingerprint(meta: dict, fingerprint_: str, folder: Path) -> None:
    if meta["fingerprint"] != fingerprint_:
        raise StoreMismatchError(
            f"the store in {folder} was built for fingerprint {meta['fingerprint']}, not {fingerprint_}: the model "
            "weights, preprocessing or numeric formats differ. Use another folder, or delete this one.")


def _check_format(meta: dict, fmt: StoreFormat, folder: Path) -> None:
    stored = _format_from_meta(meta, folder)
    if stored != fmt:
        raise StoreMismatchError(f"the store in {folder} holds {stored}, but this run computes {fmt} under the same "
                                 "fingerprint. Use another folder, or delete this one.")


def _index_shards(index: dict) -> list:
    return [(shard["file"], shard["keys"]) for shard in index["shards"]]


def _write_index(folder: Path, fmt: StoreFormat, verify_known: bool) -> None:
    """Index every sound shard on disk (dropping damaged ones) and merge the processes' fill reports.

    Each shard's checksum is verified, except (`verify_known` False) those the current index lists
    as the very file it saw: that index was written by this fill after verifying them.
    """
    known = {}
    if (folder / INDEX_FILE).exists():
        try:
            known = {shard["file"]: shard for shard in read_json(folder / INDEX_FILE, "store index")["shards"]}
        except (ValueError, KeyError, TypeError):
            logger.warning("the store index %s is damaged; rebuilding it from the shards", folder / INDEX_FILE)
    shards = []
    for path in sorted(folder.glob("shard-p*-*.npy")):
        if not _SHARD_NAME.fullmatch(path.name):
            continue
        try:
            identity = {"bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
            entry = known.get(path.name, {})
            seen = {k: entry.get(k) for k in identity} == identity
            if verify_known or not seen:
                _verify_shard(path)
            records = _map_shard(path, fmt)
            # The index's keys are trusted only for the very file it saw and verified; others are read.
            keys = entry["keys"] if seen and not verify_known else [key.decode("utf-8") for key in records["key"]]
            if len(keys) != len(records):
                raise StoreCorruptError(f"the store shard {path} holds {len(records)} rows, its index {len(keys)}")
            _check_finite_shard(path, records, fmt)
            if _SHARD_NAME.fullmatch(path.name).group(3) is None:  # written before checksums: record one now
                path = _with_checksum(path)
                identity["mtime_ns"] = path.stat().st_mtime_ns
        except StoreCorruptError as error:
            logger.warning("%s Dropping it: its images will be computed again.", error)
            path.unlink()
            continue
        shards.append({"file": path.name, "keys": keys, **identity})
    reports = [read_json(path, "fill report") for path in sorted(folder.glob("report-p*.json"))]
    last = FillReport()
    for report in reports:
        last.skipped.update(report["skipped"])
        last.images_computed += report["images_computed"]
        last.forward_passes += report["forward_passes"]
    atomic_write_json(folder / INDEX_FILE, {"shards": shards, "last_fill": last.__dict__})
    for path in folder.glob("report-p*.json"):
        path.unlink()


def _with_checksum(path: Path) -> Path:
    """Rename a shard to the name that carries its checksum; returns the new path."""
    named = path.with_name(f"{path.stem}-{checksum_file(path)}.npy")
    os.replace(path, named)
    return named


def _check_finite_shard(path: Path, records: np.ndarray, fmt: StoreFormat) -> None:
    """Pooled-size shards are read whole here; large token shards are checked as they are read instead."""
    if records.nbytes > 256 * 2**20:
        return
    stored = records["scale"] if fmt.dtype == "int8" else records["values"]
    if not np.isfinite(np.asarray(stored, dtype=np.float32)).all():
        raise StoreCorruptError(f"the store shard {path} holds non-finite values (NaN or inf): the file is damaged.")


class _Items(Dataset):
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


class _Collate:
    """(keys, one batch of pixels or None, {key: failure reason}) of a batch of `_Items`; `stack` is the
    loader's own (`PixelLoader.collate`: uint8 codes stay uint8) or torch.stack."""

    def __init__(self, stack):
        self.stack = stack

    def __call__(self, batch):
        good = [(key, pixels) for key, pixels, _ in batch if pixels is not None]
        failed = {key: reason for key, pixels, reason in batch if pixels is None}
        return [key for key, _ in good], self.stack([pixels for _, pixels in good]) if good else None, failed


def _compute(folder, fmt, batches, items, loader, encoder, options, state) -> FillReport:
    """This process's share: load (workers), encode, write shards; returns what it did."""
    from tqdm.auto import tqdm

    keys = [key for batch in batches for key in batch]
    sizes = np.cumsum([0] + [len(batch) for batch in batches])
    loader_ = DataLoader(_Items(keys, items, loader), batch_sampler=[list(range(a, b)) for a, b in zip(sizes, sizes[1:])],
                         num_workers=options.num_workers,
                         collate_fn=_Collate(getattr(loader, "collate", torch.stack)),
                         pin_memory=torch.device(options.device).type == "cuda")
    report = FillReport()
    writer = _BackgroundWriter(_ShardWriter(folder, fmt, state.process_index, options.shard_size, keys))
    progress = options.progress and state.is_main_process and bool(keys)
    try:
        with torch.inference_mode(), tqdm(total=len(keys), desc=options.description, unit="img",
                                          disable=not progress) as bar:
            for batch_keys, pixels, failed in loader_:
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
    return report


class _BackgroundWriter:
    """A `_ShardWriter` in a thread of its own, fed through a queue of at most `depth` computed batches.

    The forward of the next batch runs while this one is converted, checked and written. The queue
    is bounded, so memory stays bounded when the disk is the slower side; it holds `depth` batches
    because writing a full shard takes a few batches' time (benchmarks/bench_fill_overlap.py), and
    the forward goes on meanwhile. The price is host memory: so400m tokens at batch 256 are 0.86 GB
    of float32 per batch. An error of the writer
    (non-finite values, a full disk) is raised in the filling thread at its next `add` or at
    `close`; batches queued after it are not written, those before it are.
    """

    def __init__(self, writer: "_ShardWriter", depth: int = 4):
        self.writer, self.error, self.raised = writer, None, False
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="nearid-shard-writer", daemon=True)
        self.thread.start()

    def add(self, keys: list, values: torch.Tensor) -> None:
        self._raise()
        event = None
        if values.device.type == "cuda":  # copied to pinned memory without blocking; the thread waits for it
            values = values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.queue.put((keys, values, event))

    def close(self) -> None:
        """Write every queued batch and the last, partial shard; raise the writer's error if it had one."""
        self.queue.put(None)
        self.thread.join()
        self.writer.flush()
        self._raise()

    def _run(self) -> None:
        with torch.inference_mode():
            while (item := self.queue.get()) is not None:
                if self.error is not None:
                    continue  # drain, so the filling thread never waits on a full queue
                keys, values, event = item
                try:
                    if event is not None:
                        event.synchronize()
                    self.writer.add(keys, values)
                except BaseException as error:  # handed to the filling thread
                    self.error = error

    def _raise(self) -> None:
        if self.error is not None and not self.raised:
            self.raised = True  # once: `close` after the error's own exception adds nothing
            raise self.error


class _ShardWriter:
    """Collects encoded rows of one process into a shard-sized buffer and writes it when full."""

    def __init__(self, folder: Path, fmt: StoreFormat, process_index: int, shard_size: int, keys: list):
        self.folder, self.format, self.process_index, self.shard_size = folder, fmt, process_index, shard_size
        # A new shard never takes the name of one on disk; the index recognises a reused name by its size
        # and modification time.
        own = [int(m.group(2)) for path in folder.glob("shard-p*-*.npy")
               if (m := _SHARD_NAME.fullmatch(path.name)) and int(m.group(1)) == process_index]
        self.next_number = max(own, default=-1) + 1
        self.key_bytes = max((len(key.encode("utf-8")) for key in keys), default=1)
        self.unwritten = len(keys)  # an upper bound of the rows still to come
        self.buffer, self.filled = None, 0

    def add(self, keys: list, values: torch.Tensor):
        fields = self.format.encode(values)
        _check_finite(keys, fields, self.format.dtype)
        fields["key"] = np.array([key.encode("utf-8") for key in keys], dtype=f"S{self.key_bytes}")
        start = 0
        while start < len(keys):
            if self.buffer is None:
                capacity = max(1, min(self.shard_size, self.unwritten))
                self.buffer, self.filled = np.empty(capacity, dtype=self.format.record_dtype(self.key_bytes)), 0
            count = min(len(keys) - start, len(self.buffer) - self.filled)
            for name, values in fields.items():
                self.buffer[name][self.filled:self.filled + count] = values[start:start + count]
            self.filled += count  # only after the copy: an interruption never flushes half-written rows
            self.unwritten -= count
            start += count
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self):
        """Write the filled rows as a new shard (temporary file, fsync, rename) and start a new buffer."""
        if self.buffer is not None and self.filled:
            name = f"shard-p{self.process_index:03d}-{self.next_number:06d}"
            temp = self.folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                with open(temp, "xb") as stream:
                    np.save(stream, self.buffer[:self.filled])
                    stream.flush()
                    os.fsync(stream.fileno())
                # The checksum of the bytes on disk (just written, so read back from memory) goes into the name.
                os.replace(temp, self.folder / f"{name}-{checksum_file(temp)}.npy")
            finally:
                temp.unlink(missing_ok=True)
            self.next_number += 1
        self.buffer, self.filled = None, 0


def _check_finite(keys, fields: dict, dtype: str):
    """Refuse values that would be stored as NaN/inf (float16 overflow, or a model producing NaN)."""
    stored = fields["scale"] if dtype == "int8" else fields["values"]  # a NaN vector has a NaN scale
    finite = np.isfinite(stored.reshape(len(keys), -1)).all(axis=1)
    if not finite.all():
        bad = [key for key, ok in zip(keys, finite, strict=True) if not ok]
        raise FloatingPointError(
            f"values of {bad[:5]} are not finite when stored as {dtype} (NaN or inf from the model, or beyond the "
            "float16 range of +-65504). Check the model and its inputs, or store float32; nothing of them was kept.")
