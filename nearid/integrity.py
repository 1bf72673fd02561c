"""Checksums of the files NearID writes and later trusts: recorded at write, verified at read.

Everything NearID reads back and believes (embed-once store shards, search index files, training
checkpoints) carries a content checksum taken when it was written; reading it back recomputes the
checksum first, so a truncated file, a bad copy, bit rot or a file from elsewhere is named instead
of being used. The hash is XXH3-128 (the `xxhash` package): not cryptographic, it guards against
accidents, not attackers, and it runs at memory speed (over 10 GB/s on one core), so checking a
warm store costs little next to reading it (`benchmarks/bench_checksums.py`).

A folder of files is covered by a manifest, `{relative path: {"bytes": size, "xxh3_128": hex}}`;
sizes are compared first, so a truncated file is found without reading it.

Safetensors weights that NearID did not write (a release `model.safetensors`) are checked for a
complete layout (`check_safetensors`): the header must parse and the file must hold every byte
the header promises.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable

import xxhash

ALGORITHM = "xxh3_128"


class IntegrityError(ValueError):
    """A file does not match the checksum recorded when it was written, or is incomplete."""


def checksum_file(path) -> str:
    """The XXH3-128 hex digest of the file at `path`, hashed from a memory map (no copy of its bytes)."""
    with open(path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:
            return xxhash.xxh3_128_hexdigest(b"")
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_128_hexdigest(mapped)


def checksum_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def new_checksum():
    """A checksum of bytes fed piece by piece (`.update(data)`) as a file is written; its `.hexdigest()` is then
    `checksum_file` of that file, without reading it back."""
    return xxhash.xxh3_128()


def checksum_json(obj) -> str:
    """The checksum of `obj`'s canonical JSON (sorted keys, compact): for a file that records its own checksum."""
    return checksum_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def manifest(folder, names: Iterable[str]) -> dict:
    """{name: {"bytes", "xxh3_128"}} of the files `names` (paths relative to `folder`)."""
    folder = Path(folder)
    return {name: {"bytes": (folder / name).stat().st_size, ALGORITHM: checksum_file(folder / name)}
            for name in sorted(names)}


def manifest_of_tree(folder, subfolder: str) -> dict:
    """`manifest` of every file under `folder / subfolder`, by path relative to `folder`."""
    folder = Path(folder)
    names = [path.relative_to(folder).as_posix() for path in (folder / subfolder).rglob("*") if path.is_file()]
    return manifest(folder, names)


def damaged(folder, recorded: dict) -> dict:
    """{name: what is wrong} for each file of the manifest `recorded` that is missing, of another size, or
    of other content; empty when every file is as written."""
    folder = Path(folder)
    problems = {}
    for name, entry in recorded.items():
        path = folder / name
        if not path.is_file():
            problems[name] = "is missing"
        elif path.stat().st_size != entry["bytes"]:
            problems[name] = f"has {path.stat().st_size} bytes, {entry['bytes']} were written (truncated or replaced)"
        elif checksum_file(path) != entry[ALGORITHM]:
            problems[name] = "does not match the checksum recorded when it was written (damaged or replaced)"
    return problems


def check_safetensors(path, what: str = "weights file", remedy: str = "Download or export it again.") -> None:
    """IntegrityError naming `path` unless it is a complete safetensors file: a readable header, and
    exactly the bytes the header's tensors need. Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as stream:
            (header_bytes,) = struct.unpack("<Q", stream.read(8))
            if header_bytes > size - 8:
                raise ValueError(f"its header claims {header_bytes} bytes")
            header = json.loads(stream.read(header_bytes))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as error:
        raise IntegrityError(f"the {what} {path} is not a readable safetensors file ({error}): it is damaged or "
                             f"truncated. {remedy}") from None
    expected = 8 + header_bytes + end
    if size != expected:
        raise IntegrityError(f"the {what} {path} has {size} bytes but its header describes {expected}: it is "
                             f"{'truncated' if size < expected else 'damaged'}. {remedy}")


def check_weights(folder) -> None:
    """`check_safetensors` on every weights file of a model folder (a release, a Hub snapshot)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path, "model weights file", "Download the model again, or export it again "
                          "(nearid.hub.export_hub_folder) if you made it.")
