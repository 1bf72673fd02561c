"""The NearID benchmark: the positives joined with their distractor sources by row index (docs/method.md section 3).

`view_columns` / `distractor_columns` find `img1..3` (dataset card) or `images1..3` (reference code)
and `nimg1..3`; `join_sources` pairs the positives with the distractor sources by row index and
refuses to pair when lengths or `id`s disagree. `open_benchmark` opens the sources and joins them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import datasets

from nearid.data.readers import open_dataset
from nearid.data.split_files import select_rows

logger = logging.getLogger(__name__)


def _numbered_columns(dataset, prefixes: Sequence[str], count: int, what: str) -> tuple:
    names = dataset.column_names
    complete = [p for p in prefixes if all(f"{p}{k}" in names for k in range(1, count + 1))]
    expected = " or ".join(f"{p}1..{p}{count}" for p in prefixes)
    if len(complete) > 1:
        raise ValueError(f"{what}: found more than one of the column namings {expected}; the dataset has "
                         f"columns {names}")
    if not complete:
        raise ValueError(f"{what}: expected the columns {expected}; {_partly_found(names, prefixes, count)}the "
                         f"dataset has columns {names}")
    return tuple(f"{complete[0]}{k}" for k in range(1, count + 1))


def _partly_found(names, prefixes: Sequence[str], count: int) -> str:
    """"found img1, img3 but not img2; " for the naming most nearly complete, or "found none of them; "."""
    wanted = {p: [f"{p}{k}" for k in range(1, count + 1)] for p in prefixes}
    best = max(prefixes, key=lambda p: sum(c in names for c in wanted[p]))  # the first, on a tie
    present = [c for c in wanted[best] if c in names]
    if not present:
        return "found none of them; "
    return f"found {', '.join(present)} but not {', '.join(c for c in wanted[best] if c not in names)}; "


def view_columns(dataset, prefixes: Sequence[str] = ("img", "images"), count: int = 3) -> tuple:
    """Names of the positives' view columns: `img1..3` (dataset card) or `images1..3` (reference).

    Logs which naming was found; raises ValueError listing the dataset's columns if neither (or
    both) is complete.
    """
    found = _numbered_columns(dataset, prefixes, count, "positives view columns")
    naming = {"img": "dataset-card naming", "images": "reference-code naming"}.get(found[0][:-1], "naming")
    logger.info("positives view columns: %s (%s %r)", ", ".join(found), naming, found[0][:-1])
    return found


def distractor_columns(dataset, prefix: str = "nimg", count: int = 3) -> tuple:
    """Names of a distractor source's columns `nimg1..3`; ValueError listing the columns if absent."""
    return _numbered_columns(dataset, (prefix,), count, "distractor columns")


def _ids(dataset, what: str) -> list:
    if "id" not in dataset.column_names:
        raise ValueError(f"{what} has no 'id' column to join on; it has {dataset.column_names}")
    # No image column is read, and the ids come as one batch: iterating the column formats row by row.
    return dataset.select_columns(["id"])[:]["id"]


@dataclass(frozen=True)
class NearIDBenchmark:
    """Positives and distractor sources aligned by row index (same `id` in every row)."""

    positives: datasets.Dataset
    sources: dict
    view_columns: tuple
    distractor_columns: dict

    def __len__(self) -> int:
        return len(self.positives)

    def ids(self) -> list:
        """The `id` of every row."""
        return _ids(self.positives, "positives")

    def select(self, indices: Sequence[int]) -> "NearIDBenchmark":
        """The same rows of the positives and of every source (alignment is kept)."""
        return NearIDBenchmark(select_rows(self.positives, indices),
                               {n: select_rows(d, indices) for n, d in self.sources.items()},
                               self.view_columns, self.distractor_columns)


def join_sources(positives, sources: Mapping[str, datasets.Dataset]) -> NearIDBenchmark:
    """Pair `positives` with each distractor source by row index, after checking they agree.

    Raises ValueError when a source has another length (naming both lengths) or when the `id`
    columns differ (naming the first mismatching row and both ids).
    """
    if not sources:
        raise ValueError("no distractor sources given; the NearID benchmark needs at least one")
    views = view_columns(positives)
    ids = _ids(positives, "positives")
    distractors = {}
    for name, source in sources.items():
        if len(source) != len(ids):
            raise ValueError(f"distractor source {name!r} has {len(source)} rows but positives have "
                             f"{len(ids)}; rows join by index, so both must be the same dataset revision")
        source_ids = _ids(source, f"distractor source {name!r}")
        bad = next((i for i, (a, b) in enumerate(zip(ids, source_ids)) if a != b), None)
        if bad is not None:
            raise ValueError(f"distractor source {name!r} does not match the positives at row {bad}: "
                             f"id {source_ids[bad]!r} vs positives id {ids[bad]!r}; refusing to pair "
                             "them by row index")
        distractors[name] = distractor_columns(source)
    return NearIDBenchmark(positives, dict(sources), views, distractors)


def open_benchmark(positives, sources: Mapping, split: str = "train") -> tuple:
    """Open and join the positives and the `{name: source}` distractor sources.

    Sources are strings or `nearid.cli.DatasetSource`s (which may pin a Hub revision). Returns
    `(NearIDBenchmark, {"positives": provenance, name: provenance, ...})`.
    """
    pos, provenance = open_dataset(positives, split)
    opened, provenances = {}, {"positives": provenance}
    for name, source in sources.items():
        opened[name], provenances[name] = open_dataset(source, split)
    return join_sources(pos, opened), provenances
