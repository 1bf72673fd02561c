"""Dataset readers (docs/method.md sections 3 and 4): a dataset *source* -> rows, and encoded images.

- `open_dataset(source, split, revision)` takes a Hub dataset id, a local `save_to_disk` folder
  (Dataset or DatasetDict), a parquet file or a folder of parquet files, and returns the Dataset
  plus a provenance dict for results files. `open_mtg` adds the MTG column check, `require_columns`
  is that check, and `mtg_masks` reads one MTG view's object and part masks for the oracle.
- Images are read *encoded* (`undecoded`, `image_refs`, `image_ref`): `{"bytes": ..., "path": ...}`
  or None for a missing image (slots are never compacted); `nearid.store.image_index.ImageIndex` keys them by
  content and `nearid.images.load_image` decodes them.
- `data_origin` says where data came from ("synthetic", "local" or "hub"), for results tables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
from PIL import Image

from nearid import hub_ids
from nearid.images import ImageLoadError, load_image
from nearid.metrics import MTG_COLUMNS

_FILE_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".csv")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


def mtg_view_columns(dataset, kinds=("object_mask", "part_mask")) -> dict:
    """{"image_<view>_<kind>": the image ref of every row} of MTG's views 1 and 2: each column read once,
    undecoded (`image_refs`)."""
    rows = range(len(dataset))
    return {f"image_{view}_{kind}": image_refs(dataset, f"image_{view}_{kind}", rows) for view in (1, 2)
            for kind in kinds}


def mtg_view_masks(columns: dict, row: int, view: int, where: str) -> tuple:
    """`mtg_masks` of one view of `row`, from its `mtg_view_columns`."""
    return mtg_masks(columns[f"image_{view}_object_mask"][row], columns[f"image_{view}_part_mask"][row], where)


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
# Encoded images


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
