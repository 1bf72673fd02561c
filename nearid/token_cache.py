"""Backbone token cache: run the frozen backbone once per image, then train the head on stored tokens.

NearID training freezes the SigLIP backbone and uses no augmentation, so the post-LayerNorm patch
tokens of an image (`NearIDModel.forward_features`) are the same at every step of every epoch.
The backbone is ~670 GFLOP per so400m image and the head ~1% of that (SPEC §5): computing the
tokens once, in one batched no-grad pass over the images the run uses, turns every later epoch
into head-only work. The price is disk: 729 tokens x 1152 channels x 2 bytes = 1.68 MB per image
in float16 (0.84 MB in int8, 3.36 MB in float32), e.g. ~170 GB for 100k unique images. The size
is estimated and checked against free disk before anything is computed.

Storage dtypes:

- "float32": the tokens as computed; for exactness tests.
- "float16": rounding error ~2^-11 (0.05%) of each value; values beyond +-65504 are an error.
- "int8": symmetric per-token quantisation, `q = round(x / s)` with `s = max|x_token| / 127` stored
  as float32 beside the 127-level values. The error of each value is at most `s / 2`, so the
  relative error of a token is about `(max|x| / rms(x)) / 440` (uniform rounding noise): ~0.8%
  for Gaussian-like tokens (max ~3.5 x rms over 1152 channels), ~2% for a token whose largest
  channel is 10x its RMS. Compare head outputs on cached and live tokens before training on int8.

Layout of a cache folder (one fingerprint per folder):

    cache.json                  fingerprint, dtype, num_tokens, hidden (written first)
    tokens-p<P>-<N>.npy         shards: numpy record arrays (key, [scale,] tokens), memory-mapped
    index.json                  shard files and their keys, written last

Every file is written to a temporary name and renamed, so an interrupted build leaves only
complete shards; the next build lists them and computes only the images they lack. Shards are
immutable and named by the writing process's index, so several processes (`accelerate launch`)
build disjoint shares of the missing images into one folder without coordination beyond barriers.

Opening a folder with another fingerprint is an error rather than a silent new subfolder: a cache
is hundreds of GB, and keeping two side by side should be the caller's decision (name the folder
after the fingerprint to keep one cache per configuration).
"""

import errno
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nearid.io import atomic_write_json

FORMAT_VERSION = 1
META_FILE = "cache.json"
INDEX_FILE = "index.json"
STORAGE_DTYPES = {"float32": "<f4", "float16": "<f2", "int8": "i1"}  # little-endian on every machine
_SHARD_NAME = re.compile(r"tokens-p(\d+)-(\d+)\.npy")


class NotEnoughDiskSpace(OSError):
    """The cache would not fit on the disk that holds its folder."""


class CacheMismatchError(ValueError):
    """The cache folder was built for another fingerprint, dtype or token shape."""


# --------------------------------------------------------------------------------------------------
# Sizes and disk space


def _bytes_per_image(num_tokens: int, hidden: int, dtype: str) -> int:
    values = num_tokens * hidden * np.dtype(STORAGE_DTYPES[dtype]).itemsize
    scales = num_tokens * 4 if dtype == "int8" else 0  # one float32 scale per token
    return values + scales


def estimate_cache_bytes(num_images: int, num_tokens: int, hidden: int, dtype: str) -> int:
    """Bytes of token data for `num_images` images. Each image's key (its length in bytes) and each shard's
    header (~200 bytes) come on top: ~0.005% for so400m tokens."""
    _check_dtype(dtype)
    return num_images * _bytes_per_image(num_tokens, hidden, dtype)


def _human(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.2f} MB"


def check_free_space(folder, needed_bytes: int) -> None:
    """Raise NotEnoughDiskSpace when the disk holding `folder` (or its nearest existing parent) has
    less than `needed_bytes` free."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise NotEnoughDiskSpace(
            errno.ENOSPC,
            f"The backbone token cache in {folder} needs {needed_bytes} bytes ({_human(needed_bytes)}) but the disk "
            f"has {free} bytes ({_human(free)}) free. Free some space, put the cache folder on a larger disk, "
            "or store fewer bytes per image (dtype='int8' is half of 'float16').",
        )


def _check_dtype(dtype):
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"Token cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")


# --------------------------------------------------------------------------------------------------
# How tokens are stored


@dataclass(frozen=True)
class _TokenFormat:
    """The shape and storage dtype of cached tokens, and the conversion to and from records."""

    num_tokens: int
    hidden: int
    dtype: str

    def record_dtype(self, key_bytes: int) -> np.dtype:
        fields = [("key", f"S{key_bytes}")]
        if self.dtype == "int8":
            fields.append(("scale", "<f4", (self.num_tokens,)))
        fields.append(("tokens", STORAGE_DTYPES[self.dtype], (self.num_tokens, self.hidden)))
        return np.dtype(fields)

    def encode(self, tokens: torch.Tensor) -> dict:
        """tokens [B, T, C] (any float dtype, any device) -> {field: numpy array} in the storage dtype."""
        tokens = tokens.float()
        if self.dtype == "int8":
            values, scales = quantize_int8(tokens)
            return {"tokens": values.cpu().numpy(), "scale": scales.cpu().numpy()}
        return {"tokens": tokens.to(getattr(torch, self.dtype)).cpu().numpy()}

    def decode(self, records: np.ndarray, device=None) -> torch.Tensor:
        """Records -> float32 tokens [len(records), T, C] on `device`.

        The stored values travel to the device as they are (half or a quarter of float32) and are
        widened there: on a GPU the conversion costs nothing next to a host-side one.
        """
        tokens = torch.from_numpy(np.ascontiguousarray(records["tokens"])).to(device).float()
        if self.dtype == "int8":
            tokens *= torch.from_numpy(np.ascontiguousarray(records["scale"])).to(device).float()[..., None]
        return tokens

    def as_meta(self, fingerprint: str) -> dict:
        return {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "dtype": self.dtype,
                "num_tokens": self.num_tokens, "hidden": self.hidden}


def quantize_int8(tokens: torch.Tensor):
    """Symmetric per-token int8: tokens [..., C] -> (int8 values [..., C], float32 scales [...]).

    `tokens ~= values * scales[..., None]`, each value off by at most half its token's scale.
    """
    tokens = tokens.float()
    scales = tokens.abs().amax(dim=-1) / 127
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero token stays zero
    values = torch.round(tokens / divisor[..., None]).clamp_(-127, 127).to(torch.int8)
    return values, scales


# --------------------------------------------------------------------------------------------------
# The cache


class TokenCache:
    """Read-only view of a built cache: `get(keys)` -> float32 tokens [len(keys), num_tokens, hidden].

    Shards are memory-mapped; `get` groups the keys by shard and reads each shard's rows in file
    order, so random training batches read only the rows they need.
    """

    def __init__(self, folder, token_format: _TokenFormat, shards: list):
        self.folder = Path(folder)
        self._format = token_format
        self._shards = [np.load(self.folder / name, mmap_mode="r") for name, _ in shards]
        self._location = {}
        for shard_id, (_, keys) in enumerate(shards):
            for row, key in enumerate(keys):
                self._location.setdefault(key, (shard_id, row))

    @property
    def num_tokens(self) -> int:
        return self._format.num_tokens

    @property
    def hidden(self) -> int:
        return self._format.hidden

    @property
    def dtype(self) -> str:
        """The storage dtype: "float32", "float16" or "int8" (`get` always returns float32)."""
        return self._format.dtype

    def __contains__(self, key) -> bool:
        return key in self._location

    def __len__(self) -> int:
        return len(self._location)

    def get(self, keys: list, device=None) -> torch.Tensor:
        """Dequantised float32 tokens [len(keys), num_tokens, hidden] on `device` (default CPU), in key order."""
        try:
            locations = np.array([self._location[key] for key in keys], dtype=np.int64).reshape(-1, 2)
        except KeyError as error:
            raise KeyError(
                f"Image {error.args[0]!r} is not in the token cache at {self.folder} ({len(self)} images). "
                "Build the cache with every image the run uses (TokenCache.build computes only missing ones)."
            ) from None
        shard_ids, rows = locations[:, 0], locations[:, 1]
        stored = {"tokens": np.empty((len(keys), self.num_tokens, self.hidden), STORAGE_DTYPES[self.dtype])}
        if self.dtype == "int8":
            stored["scale"] = np.empty((len(keys), self.num_tokens), np.float32)
        for shard_id in np.unique(shard_ids):
            positions = np.flatnonzero(shard_ids == shard_id)
            positions = positions[np.argsort(rows[positions], kind="stable")]  # sequential reads
            records = self._shards[shard_id][rows[positions]]
            for name, values in stored.items():
                values[positions] = records[name]
        return self._format.decode(stored, device)

    @classmethod
    def open(cls, folder, fingerprint: str) -> "TokenCache":
        """Open a built cache; CacheMismatchError when it was built for another fingerprint."""
        folder = Path(folder)
        meta = _read_meta(folder)
        if meta is None:
            raise FileNotFoundError(
                f"No backbone token cache in {folder} ({META_FILE} is missing). Build one with TokenCache.build."
            )
        token_format = _format_from_meta(meta, folder)
        _check_fingerprint(meta, fingerprint, folder)
        index_path = folder / INDEX_FILE
        if not index_path.exists():
            raise FileNotFoundError(
                f"The token cache in {folder} has no {INDEX_FILE}: its build did not finish. Run TokenCache.build "
                "again with the same arguments; it keeps the completed shards and computes only the rest."
            )
        index = json.loads(index_path.read_text(encoding="utf-8"))
        return cls(folder, token_format, [(shard["file"], shard["keys"]) for shard in index["shards"]])

    @classmethod
    def build(cls, folder, model, items: dict, load_pixels, fingerprint: str, dtype="float16", shard_size=1024,
              batch_size=32, num_workers=0, skip_errors=False, device="cpu", autocast_dtype=None, state=None,
              progress=True) -> tuple["TokenCache", dict]:
        """Cache `model.forward_features` of every item not cached yet; return (cache, {key: reason} skipped).

        Args:
            folder: the cache folder (created if needed); it holds one fingerprint.
            model: a NearIDModel already on `device`; run in eval mode under no_grad (its mode is restored).
            items: {key: item}; equal images should share a key. A padding slot is an ordinary item.
            load_pixels: `load_pixels(item)` -> float tensor [3, H, W]; a top-level function (it runs in
                DataLoader workers) that raises ValueError naming the image when it cannot be read.
            fingerprint: identifies backbone weights, preprocessing and dtype; see `open`.
            dtype: "float16", "int8" or "float32" (see the module docstring for their errors).
            shard_size: images per shard file; building holds one shard in memory.
            skip_errors: leave images whose loading raises ValueError out (and report them) instead of stopping.
            autocast_dtype: run the backbone under `torch.autocast(device, autocast_dtype)`, e.g. torch.bfloat16.
            state: an accelerate `PartialState` when several processes build together (the folder must be
                on storage they all see); None for this process alone. One build at a time per folder.
        """
        _check_dtype(dtype)
        for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        folder, state = Path(folder), state if state is not None else _OneProcess()
        token_format = _TokenFormat(model.config.num_patches, model.config.vision_config["hidden_size"], dtype)
        indexed, shards = _start_build(folder, token_format, fingerprint, state)
        cached = {key for _, keys in shards for key in keys}
        missing = sorted(key for key in items if key not in cached)  # the same order on every process
        needed = estimate_cache_bytes(len(missing), token_format.num_tokens, token_format.hidden, dtype)
        check_free_space(folder, needed)
        state.wait_for_everyone()  # all processes listed the cache before any of them adds to it

        with state.split_between_processes(missing) as share:
            taken_names = {*indexed, *(name for name, _ in shards)}
            writer = _ShardWriter(folder, token_format, state.process_index, taken_names, shard_size, share)
            skipped = _compute_tokens(model, _KeyedItems(share, items), load_pixels, writer, batch_size,
                                      num_workers, skip_errors, device, autocast_dtype,
                                      progress and state.is_main_process)
        atomic_write_json(folder / f"skipped-p{state.process_index:03d}.json", skipped)
        state.wait_for_everyone()
        if state.is_main_process:
            _write_index(folder, shards)
        state.wait_for_everyone()
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        return cls.open(folder, fingerprint), index["skipped"]


def _start_build(folder: Path, token_format: _TokenFormat, fingerprint: str, state) -> tuple:
    """Set up the folder (main process), check it fits this build, list its shards: ({indexed}, [shards])."""
    if state.is_main_process:
        _prepare_folder(folder, token_format.as_meta(fingerprint))
    state.wait_for_everyone()
    # Every process reaches the same verdicts from the same files, so an error stops all of them.
    meta = _read_meta(folder)
    _check_fingerprint(meta, fingerprint, folder)
    if _format_from_meta(meta, folder) != token_format:
        raise CacheMismatchError(
            f"The token cache in {folder} holds {meta['dtype']} tokens [{meta['num_tokens']}, {meta['hidden']}], "
            f"but this build makes {token_format.dtype} tokens [{token_format.num_tokens}, {token_format.hidden}] "
            "under the same fingerprint. Include the dtype and model in the fingerprint, or use another folder."
        )
    indexed = _indexed_shards(folder)
    return indexed, _list_shards(folder, indexed)


class _OneProcess:
    """The parts of accelerate's PartialState that `build` uses, for a build by this process alone."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass

    @contextmanager
    def split_between_processes(self, inputs):
        yield inputs


# --------------------------------------------------------------------------------------------------
# Folder files


def _read_meta(folder: Path):
    path = folder / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _format_from_meta(meta: dict, folder: Path) -> _TokenFormat:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(
            f"The token cache in {folder} has format version {meta.get('format_version')}; this code reads version "
            f"{FORMAT_VERSION}. Delete the folder to rebuild the cache."
        )
    return _TokenFormat(meta["num_tokens"], meta["hidden"], meta["dtype"])


def _check_fingerprint(meta: dict, fingerprint: str, folder: Path):
    if meta["fingerprint"] != fingerprint:
        raise CacheMismatchError(
            f"The token cache in {folder} was built for fingerprint {meta['fingerprint']!r}, not {fingerprint!r}: "
            "the backbone weights, preprocessing or dtype differ. Use another folder for this configuration, "
            "or delete this one to rebuild it."
        )


def _prepare_folder(folder: Path, meta: dict):
    """Create the folder and its cache.json; remove temporary files and reports of interrupted builds."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in [*folder.glob(".*.tmp"), *folder.glob("skipped-p*.json")]:
        leftover.unlink(missing_ok=True)
    if not (folder / META_FILE).exists():
        atomic_write_json(folder / META_FILE, meta)


def _indexed_shards(folder: Path) -> dict:
    """{file name: keys} from index.json (empty without one)."""
    path = folder / INDEX_FILE
    if not path.exists():
        return {}
    return {shard["file"]: shard["keys"] for shard in json.loads(path.read_text(encoding="utf-8"))["shards"]}


def _list_shards(folder: Path, known: dict) -> list:
    """[(file name, keys)] of every complete shard on disk; keys from `known` where it has the file.

    Shard names are never reused (see `_ShardWriter`), so a name in `known` always means the same rows.
    """
    shards = []
    for path in sorted(folder.glob("tokens-p*-*.npy")):
        if not _SHARD_NAME.fullmatch(path.name):
            continue
        keys = known.get(path.name)
        if keys is None:  # written after the last index: read its keys (a few bytes per row)
            keys = [key.decode("utf-8") for key in np.load(path, mmap_mode="r")["key"]]
        shards.append((path.name, keys))
    return shards


def _write_index(folder: Path, shards_before: list):
    """Index every shard (those listed when the build started plus the new ones); merge the skip reports."""
    shards = _list_shards(folder, dict(shards_before))
    skipped = {}
    for report in sorted(folder.glob("skipped-p*.json")):
        skipped.update(json.loads(report.read_text(encoding="utf-8")))
    atomic_write_json(folder / INDEX_FILE, {"shards": [{"file": name, "keys": keys} for name, keys in shards],
                                            "skipped": skipped})
    for report in folder.glob("skipped-p*.json"):
        report.unlink()


# --------------------------------------------------------------------------------------------------
# Building


class _ShardWriter:
    """Collects encoded tokens of one process into a shard-sized buffer and writes it when full."""

    def __init__(self, folder: Path, token_format: _TokenFormat, process_index: int, taken_names: set,
                 shard_size: int, share: list):
        self.folder, self.format, self.process_index, self.shard_size = folder, token_format, process_index, shard_size
        # Numbers go past every name on disk *or in the index*: were a deleted shard's name reused, the
        # stale index would attach its old keys to the new rows.
        own = [int(m.group(2)) for name in taken_names
               if (m := _SHARD_NAME.fullmatch(name)) and int(m.group(1)) == process_index]
        self.next_number = max(own, default=-1) + 1
        self.key_bytes = max((len(key.encode("utf-8")) for key in share), default=1)
        self.unwritten = len(share)  # upper bound on the rows still to come (skipped images make it smaller)
        self.buffer, self.filled = None, 0

    def add(self, keys: list, tokens: torch.Tensor):
        fields = self.format.encode(tokens)
        _check_finite(keys, fields, self.format.dtype)
        fields["key"] = np.array([key.encode("utf-8") for key in keys], dtype=f"S{self.key_bytes}")
        start = 0
        while start < len(keys):
            if self.buffer is None:
                capacity = min(self.shard_size, self.unwritten)
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
        """Write the filled rows as a new shard (temporary file + rename) and start a new buffer."""
        if self.buffer is not None and self.filled:
            name = f"tokens-p{self.process_index:03d}-{self.next_number:06d}.npy"
            temp = self.folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                with open(temp, "xb") as stream:
                    np.save(stream, self.buffer[:self.filled])
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temp, self.folder / name)
            finally:
                temp.unlink(missing_ok=True)
            self.next_number += 1
        self.buffer, self.filled = None, 0


def _check_finite(keys, fields: dict, dtype: str):
    """Refuse tokens that would be stored as NaN/inf (float16 overflow, or a model producing NaN)."""
    stored = fields["scale"] if dtype == "int8" else fields["tokens"]  # a NaN token has a NaN scale
    finite = np.isfinite(stored.reshape(len(keys), -1)).all(axis=1)
    if not finite.all():
        bad = [key for key, ok in zip(keys, finite, strict=True) if not ok]
        raise ValueError(
            f"Backbone tokens of {bad[:5]} are not finite when stored as {dtype} (NaN or inf from the model, or "
            "values beyond the float16 range of +-65504). Check the model and its inputs, or use dtype='float32'."
        )


class _PixelItems(Dataset):
    """(key, pixels, None) per item, or (key, None, reason) when `skip_errors` and the loader raises ValueError."""

    def __init__(self, items: list, load_pixels, skip_errors: bool):
        self.items, self.load_pixels, self.skip_errors = items, load_pixels, skip_errors

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        key, item = self.items[index]
        try:
            return key, self.load_pixels(item), None
        except ValueError as error:
            if self.skip_errors:
                return key, None, str(error)
            raise ValueError(f"Cannot cache backbone tokens of image {key!r}: {error}. Fix or remove the "
                             "image, or build with skip_errors=True to leave it out.") from error


def _collate(batch):
    good = [(key, pixels) for key, pixels, _ in batch if pixels is not None]
    failed = {key: reason for key, pixels, reason in batch if pixels is None}
    return [key for key, _ in good], torch.stack([pixels for _, pixels in good]) if good else None, failed


class _KeyedItems:
    """`(key, items[key])` pairs read on access: items may be a lazy mapping over large encoded images."""

    def __init__(self, keys: list, items):
        self.keys, self.items = keys, items

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple:
        return self.keys[index], self.items[self.keys[index]]


def _compute_tokens(model, items, load_pixels, writer, batch_size, num_workers, skip_errors, device,
                    autocast_dtype, progress) -> dict:
    """One batched no-grad pass of the backbone over `items`, tokens to `writer`; returns skipped {key: reason}."""
    from tqdm.auto import tqdm

    device_type = torch.device(device).type
    loader = DataLoader(_PixelItems(items, load_pixels, skip_errors), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device_type == "cuda")
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    was_training, skipped = model.training, {}
    model.eval()
    try:
        with torch.no_grad(), autocast, tqdm(total=len(items), desc="caching backbone tokens", unit="img",
                                             disable=not progress or not items) as bar:
            for keys, pixels, failed in loader:
                skipped.update(failed)
                if keys:
                    writer.add(keys, model.forward_features(pixels.to(device, non_blocking=True)))
                bar.update(len(keys) + len(failed))
    finally:
        writer.flush()  # also when interrupted: the rows already computed are kept for the next build
        model.train(was_training)
    return skipped
