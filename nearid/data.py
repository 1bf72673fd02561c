"""Dataset readers shared by `evaluate.py` and `train.py` (docs/method.md sections 3 and 4).

Everything that turns a dataset *source* into rows lives here, once:

- `open_dataset(source, split, revision)` takes a Hub dataset id, a local `save_to_disk` folder
  (Dataset or DatasetDict), a parquet file or a folder of parquet files, and returns the Dataset
  plus a provenance dict for results files. `open_mtg` adds the MTG column check.
- `view_columns` / `distractor_columns` find `img1..3` (dataset card) or `images1..3` (reference
  code) and `nimg1..3`; `join_sources` pairs the positives with the distractor sources by row index
  and refuses to pair when lengths or `id`s disagree. `open_benchmark` does all three.
- `load_split_indices` / `select_rows` / `check_disjoint` read and apply split index files;
  `published_split` / `published_split_file` give the paper authors' splits of `Aleksandar/NearID`
  (shipped in `nearid/splits`), the default when `uses_published_splits(positives)`.
- Images are read *encoded* (`image_refs`, `image_ref`): `{"bytes": ..., "path": ...}` or None for
  a missing image (slots are never compacted); `nearid.store.image_index.ImageIndex` keys them by content and
  `nearid.images.load_image` decodes them.
- `dreambench_methods` / `dreambench_pairs` read the DreamBench++ samples layout
  `<root>/<method>/{src_image,tgt_image}/<relative path>`.
- `mtg_masks` reads one MTG view's object and part masks for the oracle.
- `score_items_from_layout` / `score_items_from_subject_folders` / `read_score_metadata` turn users'
  generated images (a mirrored layout, the DreamBooth layout of reference and generation folders per
  subject, or a CSV/JSON/JSONL metadata file) into `ScoreItem`s: a generated image, its
  reference(s), subject and method.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import datasets
import numpy as np
from PIL import Image

from nearid import hub_ids
from nearid.images import ImageLoadError, find_images, load_image
from nearid.metrics import (
    DREAMBENCH_METHODS,
    MTG_COLUMNS,
    canonicalize_dreambench_scores,
    dreambench_key,
    dreambench_mh,
)
from nearid.resources import PUBLISHED_SPLITS

logger = logging.getLogger(__name__)

_FILE_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".csv")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# The positives the published splits index, and their row count (nearid/splits/PROVENANCE.md).
NEARID_POSITIVES = "Aleksandar/NearID"
NEARID_NUM_ROWS = 19_386


# --------------------------------------------------------------------------------------------------
# Where data came from (for the labels of results tables)

SYNTHETIC_GENERATOR = "nearid.synthetic"  # the "generator" of the manifest.json it writes


def data_origin(location) -> str:
    """"synthetic" (written by `nearid.synthetic`: a folder of its output or the output itself),
    "local" (another existing path) or "hub" (anything else: a Hub id)."""
    path = Path(str(getattr(location, "location", location))).expanduser()
    if not path.exists():
        return "hub"
    path = path.resolve()
    for folder in (path, *path.parents[:2]):  # <data>, <data>/positives, <data>/dreambench/samples
        manifest = folder / "manifest.json"
        try:
            if manifest.is_file() and json.loads(manifest.read_text()).get("generator") == SYNTHETIC_GENERATOR:
                return "synthetic"
        except (OSError, ValueError, AttributeError):
            continue
    return "local"


# --------------------------------------------------------------------------------------------------
# Opening datasets


def open_dataset(source, split: str = "train", revision: str | None = None) -> tuple:
    """Open `source` and return `(Dataset, provenance)`.

    `source` is a string or a `nearid.cli.DatasetSource` (which may carry a Hub revision), tried as
    a local path first:
    - a `save_to_disk` folder of a Dataset (taken whole) or of a DatasetDict (`split` is picked);
    - a `.parquet` file (taken whole; `split` is not applied and recorded as None);
    - a folder of parquet files (splits inferred from file names as on the Hub, e.g.
      `data/test-00000-of-00001.parquet`; files without a split name form `train`).
    A source that does not exist locally and looks like a Hub id (`owner/name`) is loaded with
    `datasets.load_dataset(source, split=split, revision=revision)`; a revision pins it to a branch,
    tag or commit, and applies to Hub ids only.

    Provenance (flat, stable keys): kind ("local" or "hub"), source (absolute path or Hub id),
    format, split, revision (as requested), commit (of a Hub dataset: the commit it was read at, when
    known; None otherwise), fingerprint (`Dataset._fingerprint`), num_rows.
    """
    location = getattr(source, "location", source)
    revision = getattr(source, "revision", None) or revision
    path = Path(location).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to Hub datasets, but {location} is a local path; "
                             "drop the @revision or give the Hub id")
        dataset, fmt, split = _open_local(path.resolve(), split)
        kind, where = "local", str(path.resolve())
    elif _looks_like_hub_id(location):
        dataset, fmt, kind, where = _open_hub(location, split, revision), "hub", "hub", location
    else:
        raise FileNotFoundError(
            f"no such dataset {location!r}: nothing at {path.resolve()}, and it is not a Hub dataset id. Give a "
            "save_to_disk folder, a parquet file or folder, or an id like 'Aleksandar/NearID'")
    if len(dataset) == 0:
        raise ValueError(f"dataset {where} (split {split}) has no rows; check the source and split")
    provenance = {"kind": kind, "source": where, "format": fmt, "split": split, "revision": revision,
                  "commit": _hub_commit(dataset, revision) if kind == "hub" else None,
                  "fingerprint": dataset._fingerprint, "num_rows": len(dataset)}
    return dataset, provenance


def _hub_commit(dataset, revision: str | None) -> str | None:
    """The commit a Hub dataset was read at: the revision when it is a commit hash, else the name of
    the folder of its cache files (datasets names a Hub dataset's cache folder by the commit it
    resolved, online or from the cache offline); None when neither says."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    folders = {Path(f["filename"]).parent.name for f in dataset.cache_files}
    return folders.pop() if len(folders) == 1 and _COMMIT.fullmatch(next(iter(folders))) else None


def _looks_like_hub_id(source: str) -> bool:
    """`name` or `owner/name`, and no file name: what a Hub dataset id can look like. Anything else that does not
    exist locally is reported as a missing path rather than sent to the Hub."""
    return hub_ids.looks_like_hub_id(source, namespace=False) and not source.endswith(_FILE_SUFFIXES)


def _open_hub(source: str, split: str, revision: str | None):
    try:
        return datasets.load_dataset(source, split=split, revision=revision)
    except (FileNotFoundError, ConnectionError) as error:  # includes DatasetNotFoundError and offline mode
        raise FileNotFoundError(
            f"cannot load the dataset {source!r} (revision {revision or 'main'}): there is no local folder "
            f"{str(Path(source).resolve())!r} and the Hugging Face Hub did not provide it ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Check the id and revision, pass a local copy "
            "(a save_to_disk folder or parquet), or run with HF_HUB_OFFLINE=1 to use datasets already in the "
            "cache.") from None


def _open_local(path: Path, split: str) -> tuple:
    """(Dataset, format, split actually applied) of an existing local path."""
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"unknown dataset format: {path} is a file but not .parquet. Give a parquet "
                             "file, a folder of parquet files or a save_to_disk folder")
        _check_parquet_rows([path])
        return datasets.load_dataset("parquet", data_files=str(path), split="train"), "parquet", None
    if (path / "state.json").exists() and not json.loads((path / "state.json").read_text()).get("_data_files"):
        raise ValueError(f"dataset {path} has no rows (save_to_disk wrote no data files); check the source")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded, fmt = datasets.load_from_disk(str(path)), "save_to_disk"
        if isinstance(loaded, datasets.Dataset):
            return loaded, fmt, None
    elif any(path.rglob("*.parquet")):
        _check_parquet_rows(sorted(path.rglob("*.parquet")))
        loaded, fmt = datasets.load_dataset("parquet", data_dir=str(path)), "parquet"
    else:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(f"unknown dataset format in folder {path}: no save_to_disk files (state.json, "
                         f"dataset_dict.json) and no .parquet files; found {found}")
    if split not in loaded:
        raise ValueError(f"split {split!r} not in {path}; available splits: {sorted(loaded)}")
    return loaded[split], fmt, split


def _check_parquet_rows(files: Sequence[Path]) -> None:
    """Raise a clear error for unreadable or row-less parquet files (datasets' own is cryptic)."""
    import pyarrow.parquet as pq

    total = 0
    for file in files:
        try:
            total += pq.ParquetFile(file).metadata.num_rows
        except (OSError, ValueError) as error:  # ArrowInvalid is a ValueError
            raise ValueError(f"{file} is not a readable parquet file ({error})") from error
    if total == 0:
        raise ValueError(f"dataset {files[0] if len(files) == 1 else files[0].parent} has no rows; "
                         "check the source")


def open_mtg(source, split: str = "test", revision: str | None = None) -> tuple:
    """`open_dataset` for the MTG benchmark, checking the 8 `MTG_COLUMNS` are there."""
    dataset, provenance = open_dataset(source, split, revision)
    require_columns(dataset, MTG_COLUMNS, f"MTG dataset {provenance['source']}")
    return dataset, provenance


def mtg_masks(object_ref: dict | None, part_ref: dict | None, where: str) -> tuple:
    """(object mask, part mask) of one MTG view as [H, W] uint8 arrays (any value > 0 is inside).

    Masks are decoded like every image (`load_image`), then read as grayscale; a part mask of
    another size is resized (nearest) to the object mask's, so the oracle's area ratio compares like
    with like. Raises ImageLoadError, naming `where`, for a missing or undecodable mask.
    """
    masks = []
    for ref, kind in ((object_ref, "object"), (part_ref, "part")):
        if ref is None:
            raise ImageLoadError(f"{kind} mask at {where} is missing; the MTG oracle needs both masks")
        masks.append(load_image(ref, name=f"{where} ({kind} mask)").convert("L"))
    obj, part = masks
    if part.size != obj.size:
        part = part.resize(obj.size, Image.NEAREST)
    return np.asarray(obj), np.asarray(part)


def require_columns(dataset, columns: Sequence[str], what: str) -> None:
    """Raise ValueError listing the `columns` missing from `dataset` (and the ones it has)."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {dataset.column_names}")


# --------------------------------------------------------------------------------------------------
# NearID positives and distractor sources


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
    return list(dataset.select_columns(["id"])["id"])  # no image column is read


@dataclass(frozen=True)
class NearIDBenchmark:
    """Positives and distractor sources aligned by row index (same `id` in every row)."""

    positives: datasets.Dataset
    sources: dict
    view_columns: tuple
    distractor_columns: dict

    def __len__(self) -> int:
        return len(self.positives)

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


# --------------------------------------------------------------------------------------------------
# Split index files


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


# --------------------------------------------------------------------------------------------------
# Encoded images, hashing, decoding


def undecoded(dataset, columns: Sequence[str] | None = None):
    """`dataset` with image decoding off for `columns` (default: every Image column).

    Cast once before a loop; `image_refs` on the result then reads bytes without any cast.
    """
    columns = columns or [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
    for column in columns:
        if not isinstance(dataset.features.get(column), datasets.Image):
            raise ValueError(f"column {column!r} is not an image column; image columns: "
                             f"{[c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]}")
        if dataset.features[column].decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def image_refs(dataset, column: str, rows: Sequence[int]) -> list:
    """Encoded images `{"bytes": bytes | None, "path": str | None}` of `rows`, None where missing.

    Nothing is decoded; other columns are not read.
    """
    sub = undecoded(dataset.select_columns([column]), [column])
    return [None if ref is None else {"bytes": ref.get("bytes"), "path": ref.get("path")}
            for ref in sub[list(rows)][column]]


def image_ref(dataset, column: str, row: int):
    """The encoded image at (`row`, `column`) as in `image_refs`, or None if it is missing."""
    return image_refs(dataset, column, [row])[0]


# --------------------------------------------------------------------------------------------------
# DreamBench++ samples layout


def dreambench_methods(samples_root) -> list:
    """Sorted method folders under `samples_root` that hold a `tgt_image` folder."""
    root = Path(samples_root)
    if not root.is_dir():
        raise FileNotFoundError(f"DreamBench++ samples folder {root} does not exist; expected "
                                "<root>/<method>/{src_image,tgt_image}/...")
    methods = sorted(p.name for p in root.iterdir() if (p / "tgt_image").is_dir())
    if not methods:
        raise FileNotFoundError(f"no method folder with a tgt_image folder under {root}; found "
                                f"{sorted(p.name for p in root.iterdir())[:10]}")
    return methods


def dreambench_pairs(samples_root, method: str) -> list:
    """`[(key, reference path, generated path)]` of every generated image of `method`, sorted by key.

    Each `<root>/<method>/tgt_image/<rel>` pairs with `<root>/<method>/src_image/<rel>`; the key is
    `metrics.dreambench_key(<rel>)`.
    """
    base = Path(samples_root) / method
    tgt_root, src_root = base / "tgt_image", base / "src_image"
    if not tgt_root.is_dir():
        raise FileNotFoundError(f"no generated images folder {tgt_root}; methods with one: "
                                f"{dreambench_methods(samples_root)}")
    pairs = {}
    generated, _ = find_images(tgt_root)
    for tgt in generated:
        rel = tgt.relative_to(tgt_root).as_posix()
        src = src_root / rel
        if not src.is_file():
            raise FileNotFoundError(f"generated image {tgt} has no reference image at {src}")
        key = dreambench_key(rel)
        if key in pairs:
            raise ValueError(f"{tgt} and {pairs[key][2]} have the same key {key!r}; keep one of them")
        pairs[key] = (key, src, tgt)
    if not pairs:
        raise FileNotFoundError(f"no image files under {tgt_root}")
    return sorted(pairs.values())


# --------------------------------------------------------------------------------------------------
# Users' generated images and their references (`evaluate.py score`)

SCORE_REQUIRED_COLUMNS = ("generated", "reference")
SCORE_OPTIONAL_COLUMNS = ("subject", "method")
SCORE_METADATA_SUFFIXES = (".csv", ".json", ".jsonl")


@dataclass(frozen=True)
class ScoreItem:
    """One generated image and the reference image(s) it is scored against.

    `generated` and `references` are paths as shown in reports, relative to `root` (absolute ones
    stay absolute); `where` names the place that declared the item, for errors.
    """

    method: str
    subject: str
    generated: str
    references: tuple
    root: Path
    where: str

    def path(self, name: str) -> Path:
        return self.root / name


def _mirrored_items(root: Path, base: Path, method: str) -> tuple:
    """(ScoreItems of one method's folder, [(file, reason)] of files under its tgt_image that are not images)."""
    items = []
    for key, src, tgt in dreambench_pairs(base, method):
        rel = tgt.relative_to(base / method / "tgt_image")
        subject = rel.parts[0] if len(rel.parts) > 1 else key  # <subject>/<prompt>.png, else the file itself
        items.append(ScoreItem(method, subject, tgt.relative_to(root).as_posix(),
                               (src.relative_to(root).as_posix(),), root, str(tgt)))
    return items, find_images(base / method / "tgt_image")[1]


def score_items_from_layout(samples_root, methods: Sequence[str] | None = None) -> tuple:
    """(`ScoreItem`s of a DreamBench++-style mirrored layout, one per generated image, and the
    `[(file, reason)]` of files that were left out because they are not images Pillow reads).

    Either one method, `<root>/{src_image,tgt_image}/<rel>` (the method is named after `<root>`),
    or several, `<root>/<method>/{src_image,tgt_image}/<rel>` (`methods` picks some; default all).
    Each generated image `tgt_image/<rel>` (any format Pillow decodes) has one reference,
    `src_image/<rel>`; its subject is the first folder of `<rel>` (DreamBench++'s
    `<category>_<NN>_<subject>`), or the key of `<rel>` when the image lies directly in `tgt_image`.
    """
    root = Path(samples_root).resolve()
    if (root / "tgt_image").is_dir():
        if methods and list(methods) != [root.name]:
            raise ValueError(f"{root} holds one method ({root.name!r}: src_image/ and tgt_image/ directly), "
                             f"so --methods {list(methods)} does not apply; drop --methods")
        return _mirrored_items(root, root.parent, root.name)
    items, ignored = [], []
    for method in methods or dreambench_methods(root):
        method_items, method_ignored = _mirrored_items(root, root, method)
        items += method_items
        ignored += method_ignored
    return items, ignored


def score_items_from_subject_folders(references, generations, methods: Sequence[str] | None = None) -> tuple:
    """(`ScoreItem`s, left-out files, unused references) of the DreamBooth layout: several references per
    subject, shared by every generation of that subject.

        references/<subject>/<image>                    the reference images of each subject
        generations/<method>/<subject>/<image>          several methods side by side, or
        generations/<subject>/<image>                   one method (named after the generations folder)

    Every generated image (any format Pillow reads, in any subfolder of its subject) is scored
    against all references of its subject. Generations of a subject without references are an error
    naming them; files that are not images are returned as left out `[(file, reason)]`, and subjects
    whose references a method did not generate as unused `[(reference folder, method)]`.
    """
    ref_root, gen_root = Path(references).resolve(), Path(generations).resolve()
    for root, flag, shape in ((ref_root, "--references", "<subject>/<image>"),
                              (gen_root, "--generations", "<method>/<subject>/<image> or <subject>/<image>")):
        if not root.is_dir():
            raise FileNotFoundError(f"{flag} {root}: no such folder; expected a folder of {shape}")
    subject_refs, left_out = _subject_images(ref_root, "references")
    if not subject_refs:
        raise ValueError(f"--references {ref_root} has no <subject>/ folders with images; expected "
                         "references/<subject>/<image>")
    folders = _method_folders(gen_root, set(subject_refs), methods)
    root = Path(os.path.commonpath([ref_root, gen_root]))
    items, orphans, unused = [], [], []
    for method, folder in folders.items():
        generated, ignored = _subject_images(folder, f"generations of {method}")
        left_out += ignored
        orphans += [f"{method}/{subject}" for subject in generated if subject not in subject_refs]
        unused += [(str(ref_root / subject), method) for subject in subject_refs if subject not in generated]
        for subject, images in generated.items():
            refs = tuple(path.relative_to(root).as_posix() for path in subject_refs.get(subject, ()))
            items += [ScoreItem(method, subject, image.relative_to(root).as_posix(), refs, root, str(image))
                      for image in images]
    if orphans:
        raise ValueError(f"generations without references: {', '.join(orphans[:5])}"
                         f"{f' and {len(orphans) - 5} more' if len(orphans) > 5 else ''}; every subject needs "
                         f"{ref_root}/<subject>/ with its reference images (subject folder names must match)"
                         f"{_case_hint([o.rpartition('/')[2] for o in orphans], subject_refs)}")
    if not items:
        raise ValueError(_no_generations_message(gen_root, sorted(subject_refs)))
    return items, left_out, unused


def _case_hint(names: Sequence[str], subjects) -> str:
    """'; 'Chelsea' differs from the reference subject 'chelsea' only in letter case ...' or ''."""
    by_lower = {subject.lower(): subject for subject in subjects}
    pairs = [(name, by_lower[name.lower()]) for name in dict.fromkeys(names)
             if name.lower() in by_lower and by_lower[name.lower()] != name]
    if not pairs:
        return ""
    listed = ", ".join(f"{name!r} vs the reference subject {subject!r}" for name, subject in pairs[:5])
    return (f". Folder names differ only in letter case: {listed}; names must match exactly (case-sensitive), so "
            "rename one of them")


def _no_generations_message(gen_root: Path, subjects: Sequence[str]) -> str:
    """Why no generated image matched a reference subject: both sets of names, and where images lie."""
    found, loose, nested = [], [], []
    for folder in sorted(p for p in gen_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        direct = find_images(folder, recursive=False)[0]
        below = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        found.append(f"{folder.name}/ ({len(direct)} image{'' if len(direct) == 1 else 's'} directly in it"
                     f"{', folders ' + ', '.join(below[:5]) if below else ''})")
        loose += [folder.name] if direct else []
        nested += below
    shown = ", ".join(subjects[:10]) + (f" and {len(subjects) - 10} more" if len(subjects) > 10 else "")
    message = (f"no generated images under {gen_root} belong to a reference subject. Reference subjects "
               f"(--references): {shown}. Folders under --generations: {'; '.join(found[:10]) or 'none'}")
    if loose:
        message += (f". Images lie directly in {', '.join(f'{name}/' for name in loose[:5])}: put them in a "
                    "<subject>/ folder named like the references")
    hint = _case_hint([p.name for p in gen_root.iterdir() if p.is_dir()] + nested, subjects)
    return message + hint + (". Expected generations/<method>/<subject>/<image> or generations/<subject>/<image>, "
                             "with <subject> a folder name of --references")


def _subject_images(root: Path, what: str) -> tuple:
    """({subject folder: sorted image files in it, any depth}, [(file, reason)] of other files)."""
    images, left_out = {}, []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found, others = find_images(folder)
        left_out += [(str(path), reason) for path, reason in others]
        if found:
            images[folder.name] = found
    stray = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    left_out += [(str(path), f"not in a <subject>/ folder of the {what}") for path in sorted(stray)]
    return images, left_out


def _method_folders(gen_root: Path, subjects: set, methods: Sequence[str] | None) -> dict:
    """{method: folder of its subject folders}: one method when generations/ holds subject folders."""
    children = sorted(p for p in gen_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if any(child.name in subjects for child in children):
        if methods and list(methods) != [gen_root.name]:
            raise ValueError(f"{gen_root} holds subject folders directly (one method, {gen_root.name!r}), so "
                             f"--methods {list(methods)} does not apply; drop --methods")
        return {gen_root.name: gen_root}
    found = {child.name: child for child in children}
    unknown = [m for m in methods or () if m not in found]
    if unknown:
        raise ValueError(f"--methods {unknown} not found under {gen_root}; methods there: {sorted(found)}")
    return {m: found[m] for m in (methods or found)}


def read_score_metadata(metadata, images_dir=None) -> list:
    """`ScoreItem`s from a metadata file mapping generated images to reference images.

    Formats (by suffix): `.csv` with a header line; `.jsonl`, one JSON object per line; `.json`, a
    list of objects. Columns/keys: `generated` and `reference` (required), `subject` and `method`
    (optional); nothing else. In JSON a `reference` may be a list of paths; in CSV a generated image
    with several references takes one line per reference. Lines of the same generated image are
    merged (their subject and method must agree). Paths are relative to `images_dir` (default: the
    metadata file's folder) unless absolute. `subject` defaults to the (alphabetically first)
    reference, `method` to the name of the images folder.

    Raises FileNotFoundError naming the metadata line and the path for a missing image, and
    ValueError for an empty file, unknown or missing columns, or a repeated (generated, reference).
    """
    path = Path(metadata)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {path} does not exist; expected a CSV, JSON or JSONL file "
                                "with columns generated, reference[, subject, method]")
    root = Path(images_dir).resolve() if images_dir else path.resolve().parent
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {root} does not exist; --images names the folder the "
                                f"metadata paths are relative to")
    merged = {}
    for where, entry in _metadata_entries(path):
        generated, references, subject, method = _score_entry(entry, where, root)
        previous = merged.setdefault(generated, {"where": where, "references": [], "subject": subject,
                                                 "method": method})
        _merge_entry(previous, references, subject, method, where, generated)
    if not merged:
        raise ValueError(f"metadata file {path} lists no images; expected at least one line with a "
                         "generated and a reference image")
    return [ScoreItem(m["method"] or root.name, m["subject"] or sorted(m["references"])[0], generated,
                      tuple(m["references"]), root, m["where"]) for generated, m in merged.items()]


def _merge_entry(previous: dict, references: list, subject, method, where: str, generated: str) -> None:
    for name, value in (("subject", subject), ("method", method)):
        if value is not None and previous[name] not in (None, value):
            raise ValueError(f"{where}: {name} {value!r} of generated image {generated!r} disagrees with "
                             f"{previous[name]!r} at {previous['where']}; give one {name} per generated image")
        previous[name] = previous[name] or value
    for reference in references:
        if reference in previous["references"]:
            raise ValueError(f"{where}: reference {reference!r} of generated image {generated!r} is listed "
                             "twice; list each (generated, reference) pair once")
        previous["references"].append(reference)


def _metadata_entries(path: Path) -> list:
    """[(where, entry)] of a metadata file, `where` naming the file and line (or JSON list entry)."""
    suffix = path.suffix.lower()
    if suffix not in SCORE_METADATA_SUFFIXES:
        raise ValueError(f"metadata file {path} has an unknown format {path.suffix!r}; expected one of "
                         f"{', '.join(SCORE_METADATA_SUFFIXES)}")
    text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM spreadsheet programs write
    if suffix == ".csv":
        return _csv_entries(path, text)
    if suffix == ".jsonl":
        return [(f"{path} line {n}", _json_value(line, f"{path} line {n}"))
                for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    entries = _json_value(text, str(path)) if text.strip() else []
    if not isinstance(entries, list):
        raise ValueError(f"metadata file {path} holds a JSON {type(entries).__name__}; expected a list of "
                         'objects like {"generated": "gen.png", "reference": ["ref1.png", "ref2.png"]}')
    return [(f"{path} entry {n}", entry) for n, entry in enumerate(entries, start=1)]


def _json_value(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error})") from error


def _csv_entries(path: Path, text: str) -> list:
    import csv

    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    _check_columns(reader.fieldnames, f"{path} line 1 (header)")
    entries = []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if None in row:
            raise ValueError(f"{where} has more fields than the header {reader.fieldnames}; quote "
                             "paths that contain commas")
        entries.append((where, {k: v for k, v in row.items() if v not in (None, "")}))
    return entries


def _check_columns(columns, where: str) -> None:
    known = SCORE_REQUIRED_COLUMNS + SCORE_OPTIONAL_COLUMNS
    unknown = [c for c in columns if c not in known]
    missing = [c for c in SCORE_REQUIRED_COLUMNS if c not in columns]
    if unknown or missing:
        found = f"unknown column(s) {unknown}" if unknown else f"missing or empty column(s) {missing}"
        raise ValueError(f"{where}: {found}; expected columns {list(SCORE_REQUIRED_COLUMNS)} and "
                         f"optionally {list(SCORE_OPTIONAL_COLUMNS)}, found {list(columns)}")


def _score_entry(entry, where: str, root: Path) -> tuple:
    """(generated, [references], subject or None, method or None) of one entry; files checked."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with keys generated, reference[, subject, method], "
                         f"found a {type(entry).__name__}")
    _check_columns(list(entry), where)
    references = entry["reference"] if isinstance(entry["reference"], list) else [entry["reference"]]
    names = [("generated", entry["generated"])] + [("reference", r) for r in references]
    for column, name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: {column} must be a non-empty path string, found {name!r}")
        if not (root / name).is_file():
            raise FileNotFoundError(f"{where}: {column} image {name!r} not found (looked for {root / name}); "
                                    f"paths are relative to {root}, set another folder with --images")
    if not references:
        raise ValueError(f"{where}: reference is an empty list; give at least one reference image")
    optional = [entry.get(c) for c in SCORE_OPTIONAL_COLUMNS]
    return (entry["generated"], references, *(None if v is None else str(v) for v in optional))


# --------------------------------------------------------------------------------------------------
# DreamBench++ rating files (published per-image scores and human ratings)


def _read_rating_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing rating file {path}; expected the DreamBench++ ratings "
                                "layout (see tests/data/dreambench_plus/PROVENANCE.md)")
    return _json_value(path.read_text(), f"rating file {path}")


def load_dreambench_scores(root, scorer: str, methods: Sequence[str] = DREAMBENCH_METHODS) -> dict:
    """Read `<root>/<scorer>/<method>.json` for each method -> {method: {canonical key: score}}.

    `scorer` is a folder name such as "data_nearid_rating" (or a nested one,
    "data_gpt_rating/concept_preservation_full").
    """
    root = Path(root)
    return {m: canonicalize_dreambench_scores(_read_rating_file(root / scorer / f"{m}.json"),
                                              f"{scorer}/{m}.json") for m in methods}


def load_dreambench_human(root, methods: Sequence[str] = DREAMBENCH_METHODS) -> dict:
    """Read `<root>/data_human_rating/merged_data/group{1,2}/<method>-cp.json` -> {method: (g1, g2)}."""
    base = Path(root) / "data_human_rating" / "merged_data"
    return {m: tuple(canonicalize_dreambench_scores(_read_rating_file(base / g / f"{m}-cp.json"),
                                                    f"data_human_rating/merged_data/{g}/{m}-cp.json")
                     for g in ("group1", "group2")) for m in methods}


def dreambench_mh_from_files(root, scorer: str, methods: Sequence[str] = DREAMBENCH_METHODS) -> dict:
    """`dreambench_mh` of a scorer folder against the human ratings, both under `root`."""
    scores = load_dreambench_scores(root, scorer, methods)
    human = load_dreambench_human(root, methods)
    return dreambench_mh(scores, human, methods, scorer=scorer)
