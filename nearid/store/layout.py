"""The files of a store on disk: one folder per fingerprint under a store root, and what each folder holds.

    <root>/<fingerprint>/       one store folder per way of computing images (`store_folder`)
        store.json              fingerprint, payload shape and storage dtype (written first)
        shard-p<P>-<N>-<XXH>.npy
                                numpy record arrays (key, [scale,] values), written by process P;
                                XXH is the XXH3-128 checksum of the file
        index.json              the shards and their keys, and the last fill's report (written last)
        store.lock              held by the run filling the store (store.lock.owner.json says which)

What is read back is checked here: the description against the fingerprint and format of the run,
each shard against the checksum in its name and against the store's record layout.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from nearid.integrity import checksum_file
from nearid.io import atomic_write_json, read_json
from nearid.store.format import FORMAT_VERSION, StoreFormat

logger = logging.getLogger(__name__)

META_FILE = "store.json"
INDEX_FILE = "index.json"
LOCK_FILE = "store.lock"
# shard-p<process>-<number>-<checksum>.npy; shards written before checksums have no checksum part.
SHARD_NAME = re.compile(r"shard-p(\d+)-(\d+)(?:-([0-9a-f]{32}))?\.npy")


class StoreMismatchError(ValueError):
    """The store folder was built for another fingerprint or payload format."""


class StoreCorruptError(ValueError):
    """A shard of a store is damaged (truncated, wrong layout, or non-finite values)."""


def store_folder(root, fingerprint_: str) -> Path:
    """The folder under the store root `root` that holds the values of `fingerprint_`."""
    if not fingerprint_ or fingerprint_ in (".", "..") or "/" in fingerprint_ or os.sep in fingerprint_:
        raise ValueError(f"a store fingerprint names one folder under the store root, got {fingerprint_!r}")
    return Path(root) / fingerprint_


def shard_stem(process_index: int, number: int) -> str:
    """The name of a shard before its checksum is appended: shard-p<P>-<N>."""
    return f"shard-p{process_index:03d}-{number:06d}"


def next_shard_number(folder: Path, process_index: int) -> int:
    """The first shard number of `process_index` that no shard in `folder` has taken."""
    own = [int(m.group(2)) for path in folder.glob("shard-p*-*.npy")
           if (m := SHARD_NAME.fullmatch(path.name)) and int(m.group(1)) == process_index]
    return max(own, default=-1) + 1


def read_meta(folder: Path):
    path = folder / META_FILE
    return read_json(path, "store description") if path.exists() else None


def format_from_meta(meta: dict, folder: Path) -> StoreFormat:
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreMismatchError(f"the store in {folder} has format version {meta.get('format_version')}; this "
                                 f"code reads version {FORMAT_VERSION}. Delete the folder to rebuild it.")
    return StoreFormat(tuple(meta["shape"]), meta["dtype"])


def check_fingerprint(meta: dict, fingerprint_: str, folder: Path) -> None:
    if meta["fingerprint"] != fingerprint_:
        raise StoreMismatchError(
            f"the store in {folder} was built for fingerprint {meta['fingerprint']}, not {fingerprint_}: the model "
            "weights, preprocessing or numeric formats differ. Use another folder, or delete this one.")


def check_format(meta: dict, fmt: StoreFormat, folder: Path) -> None:
    stored = format_from_meta(meta, folder)
    if stored != fmt:
        raise StoreMismatchError(f"the store in {folder} holds {stored}, but this run computes {fmt} under the same "
                                 "fingerprint. Use another folder, or delete this one.")


def index_shards(index: dict) -> list:
    return [(shard["file"], shard["keys"]) for shard in index["shards"]]


def verify_shard(path: Path) -> None:
    """StoreCorruptError naming the shard when its bytes differ from the checksum in its name."""
    recorded = SHARD_NAME.fullmatch(path.name).group(3)
    if recorded is None or not path.is_file():
        return  # written before checksums (checked when a fill indexes it), or missing (`map_shard` says so)
    if checksum_file(path) != recorded:
        raise StoreCorruptError(f"the store shard {path} does not match the checksum recorded when it was written: "
                                "its bytes changed since (bit rot, a bad copy, or an edit). Run the command again: it "
                                "drops the shard and computes its images again.")


def map_shard(path: Path, fmt: StoreFormat) -> np.ndarray:
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


def write_index(folder: Path, fmt: StoreFormat, verify_known: bool, last_fill: dict, written: list = ()) -> None:
    """Index every sound shard on disk (dropping damaged ones), with `last_fill`, the report of the last fill.

    Each shard's checksum is verified, except (`verify_known` False) the very files that the current
    index lists (that index was written by this fill after verifying them) or that this fill wrote
    (`written`, index entries of the writers: their checksums were taken from the bytes written).
    """
    known = {}
    if (folder / INDEX_FILE).exists():
        try:
            known = {shard["file"]: shard for shard in read_json(folder / INDEX_FILE, "store index")["shards"]}
        except (ValueError, KeyError, TypeError):
            logger.warning("the store index %s is damaged; rebuilding it from the shards", folder / INDEX_FILE)
    known.update((shard["file"], shard) for shard in written)
    shards = []
    for path in sorted(folder.glob("shard-p*-*.npy")):
        if not SHARD_NAME.fullmatch(path.name):
            continue
        try:
            identity = {"bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
            entry = known.get(path.name, {})
            seen = {k: entry.get(k) for k in identity} == identity
            trusted = seen and not verify_known  # verified earlier in this fill, or written by it (values checked)
            if not trusted:
                verify_shard(path)
            records = map_shard(path, fmt)
            # Known keys are trusted only for the very file that was verified or written; others are read.
            keys = entry["keys"] if trusted else [key.decode("utf-8") for key in records["key"]]
            if len(keys) != len(records):
                raise StoreCorruptError(f"the store shard {path} holds {len(records)} rows, its index {len(keys)}")
            if not trusted:
                check_finite_shard(path, records, fmt)
            if SHARD_NAME.fullmatch(path.name).group(3) is None:  # written before checksums: record one now
                path = with_checksum(path)
                identity["mtime_ns"] = path.stat().st_mtime_ns
        except StoreCorruptError as error:
            logger.warning("%s Dropping it: its images will be computed again.", error)
            path.unlink()
            continue
        shards.append({"file": path.name, "keys": keys, **identity})
    atomic_write_json(folder / INDEX_FILE, {"shards": shards, "last_fill": last_fill})


def with_checksum(path: Path) -> Path:
    """Rename a shard to the name that carries its checksum; returns the new path."""
    named = path.with_name(f"{path.stem}-{checksum_file(path)}.npy")
    os.replace(path, named)
    return named


def check_finite_shard(path: Path, records: np.ndarray, fmt: StoreFormat) -> None:
    """Pooled-size shards are read whole here; large token shards are checked as they are read instead."""
    if records.nbytes > 256 * 2**20:
        return
    stored = records["scale"] if fmt.dtype == "int8" else records["values"]
    if not np.isfinite(np.asarray(stored, dtype=np.float32)).all():
        raise StoreCorruptError(f"the store shard {path} holds non-finite values (NaN or inf): the file is damaged.")

