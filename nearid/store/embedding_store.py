"""Reading a built store: `EmbeddingStore`, memory-mapped, checked as it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from nearid.io import read_json
from nearid.store.format import StoreFormat, finite_rows
from nearid.store.layout import (
    INDEX_FILE,
    META_FILE,
    StoreCorruptError,
    check_fingerprint,
    format_from_meta,
    index_shards,
    map_shard,
    read_meta,
    store_folder,
    verify_shard,
)


class EmbeddingStore:
    """Read view of a store folder: `get(keys)` -> float32 [len(keys), *shape], checked as it is read.

    Shards are memory-mapped, and each read copies only the rows asked for, in file order. A store
    can be sent to DataLoader worker processes: it travels as its folder and index, and each process
    maps the shards again (a pickled memory map would travel as a full copy of its file).
    """

    def __init__(self, root, fingerprint_: str, fmt: StoreFormat, shards: Sequence[tuple]):
        self.root, self.fingerprint, self.format = Path(root), fingerprint_, fmt
        self.folder = store_folder(root, fingerprint_)
        self._names = [name for name, _ in shards]
        self._shards = self._map_shards()
        self._location = {}
        for shard_id, (_, keys) in enumerate(shards):
            for row, key in enumerate(keys):
                self._location.setdefault(key, (shard_id, row))

    def _map_shards(self) -> list:
        """Per shard, {field: its column of the memory-mapped records} (views, nothing is read)."""
        records = [map_shard(self.folder / name, self.format) for name in self._names]
        return [{field: shard[field].view(np.ndarray) for field in self.format.fields()} for shard in records]

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_shards"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._shards = self._map_shards()

    @classmethod
    def open(cls, root, fingerprint_: str, verify: bool = True) -> "EmbeddingStore":
        """Open the built store of `fingerprint_` under the store root `root` (as `fill` filled it).

        StoreMismatchError when its folder holds another fingerprint, StoreCorruptError naming a damaged
        shard (`verify`: every shard's checksum is checked first; `fill` has just checked them).
        """
        folder = store_folder(root, fingerprint_)
        meta = read_meta(folder)
        if meta is None:
            raise FileNotFoundError(f"no embedding store in {folder} ({META_FILE} is missing); build one first")
        check_fingerprint(meta, fingerprint_, folder)
        if not (folder / INDEX_FILE).exists():
            raise FileNotFoundError(f"the store in {folder} has no {INDEX_FILE}: its build did not finish. Run the "
                                    "same command again; it keeps the finished shards and computes only the rest.")
        index = read_json(folder / INDEX_FILE, "store index")
        if verify:
            for name, _ in index_shards(index):
                verify_shard(folder / name)
        return cls(root, fingerprint_, format_from_meta(meta, folder), index_shards(index))

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
        finite = finite_rows(values)
        if bool(finite.all()):
            return
        bad = int(torch.nonzero(~finite)[0])
        shard = self.folder / self._names[self._location[keys[bad]][0]]
        raise StoreCorruptError(
            f"the store shard {shard} holds non-finite values (NaN or inf) for image {keys[bad]!r}: the file is "
            "damaged. Delete it and run the command again; only the images in that shard are computed again.")

