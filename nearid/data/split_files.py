"""Split index files: which rows of the positives train, validate and test.

`load_split_indices` / `select_rows` / `check_disjoint` read and apply split index files (JSON lists
of row indices); `published_split` / `published_split_file` give the paper authors' splits of
`Aleksandar/NearID` (shipped in `nearid/splits`), the default when `uses_published_splits(positives)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from nearid.resources import PUBLISHED_SPLITS

# The positives the published splits index, and their row count (nearid/splits/PROVENANCE.md).
NEARID_POSITIVES = "Aleksandar/NearID"
NEARID_NUM_ROWS = 19_386


def uses_published_splits(positives) -> bool:
    """Whether `positives` (a string or `nearid.cli.DatasetSource`) is `Aleksandar/NearID`, whose rows the
    published splits index (any revision; the row count is checked when the rows are read)."""
    location = str(getattr(positives, "location", positives))
    return location.casefold() == NEARID_POSITIVES.casefold()


def published_split_file(name: str) -> Path:
    """The shipped split file "test" or "val" of the paper's authors (nearid/splits/PROVENANCE.md)."""
    if name not in ("test", "val"):
        raise ValueError(f"the published split files are 'test' and 'val' ('train' is every other row), not {name!r}")
    return PUBLISHED_SPLITS / f"{name}.json"


def published_split(name: str) -> list:
    """Row positions of the published split "train", "val" or "test" of `Aleksandar/NearID` (train: every row
    in neither of the other two)."""
    if name != "train":
        return load_split_indices(published_split_file(name), NEARID_NUM_ROWS)
    held_out = set(published_split("val")) | set(published_split("test"))
    return [row for row in range(NEARID_NUM_ROWS) if row not in held_out]


def _check_published_rows(path: Path, num_rows: int | None) -> None:
    if num_rows is None or num_rows == NEARID_NUM_ROWS or path.resolve().parent != PUBLISHED_SPLITS:
        return
    raise ValueError(f"the published NearID split {path.name} indexes the {NEARID_NUM_ROWS:,} rows of the "
                     f"'train' split of {NEARID_POSITIVES}, but these positives have {num_rows:,} rows, so its "
                     f"positions would pick other samples. Use a revision of {NEARID_POSITIVES} with all "
                     f"{NEARID_NUM_ROWS:,} rows, or give split files made for these rows (JSON lists of row indices)")


def load_split_indices(path, num_rows: int | None = None) -> list:
    """Row indices from a JSON split file, in file order.

    The file holds a JSON list of ints, or an object `{"indices": [...]}` (room for metadata next to
    the list). Indices must be non-negative, unique, `< num_rows` when given, and at least one. A
    published split file (`published_split_file`) also needs exactly the 19,386 rows it was made for.
    """
    path = Path(path)
    _check_published_rows(path, num_rows)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist; expected a JSON list of row indices")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"split file {path} is not valid JSON ({error}); expected a list of row indices") from error
    if isinstance(data, dict) and "indices" in data:
        data = data["indices"]
    if not isinstance(data, list):
        raise ValueError(f"split file {path} holds a {type(data).__name__}; expected a JSON list of row "
                         "indices or an object {\"indices\": [...]}")
    return check_indices(data, num_rows, f"split file {path}")


def check_indices(indices: Sequence, num_rows: int | None, what: str = "indices") -> list:
    """Validate row indices (ints, >= 0, unique, < num_rows, non-empty); returns them as a list."""
    indices = list(indices)
    if not indices:
        raise ValueError(f"{what} is empty; a split needs at least one row")
    bad = next((i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0), None)
    if bad is not None:
        raise ValueError(f"{what}: row indices must be non-negative integers, found {bad!r}")
    if num_rows is not None and max(indices) >= num_rows:
        raise ValueError(f"{what}: row index {max(indices)} is out of range for a dataset of {num_rows} "
                         "rows; was the split made for another dataset or revision?")
    if len(set(indices)) != len(indices):
        seen = set()
        duplicate = next(i for i in indices if i in seen or seen.add(i))
        raise ValueError(f"{what}: row index {duplicate} appears more than once")
    return indices


def select_rows(dataset, indices: Sequence[int]):
    """`dataset.select(indices)` after `check_indices` against its length."""
    return dataset.select(check_indices(indices, len(dataset)))


def check_disjoint(splits: Mapping[str, Sequence[int]]) -> None:
    """Raise ValueError naming two splits and a shared row if any two splits overlap."""
    names = list(splits)
    for a, first in enumerate(names):
        for second in names[a + 1:]:
            shared = sorted(set(splits[first]) & set(splits[second]))
            if shared:
                raise ValueError(f"splits {first!r} and {second!r} share {len(shared)} rows (first: "
                                 f"{shared[0]}); split files must be disjoint")
