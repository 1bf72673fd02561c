"""The unique images of a run, keyed by content: each is read, computed and stored once."""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np
import torch

from nearid.images import ImageLoadError, content_hash


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

