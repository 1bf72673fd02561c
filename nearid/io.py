"""Small file utilities shared by every part of NearID: atomic writes, strict JSON, CSV, disk errors.

A file written here is complete or absent: it is written to a temporary name beside its
destination and renamed (`os.replace`), so an interrupted run leaves the old file or the new one,
never a partial one. Temporary files get the normal permissions of the user's umask (not the 0600
of `tempfile.mkstemp`), and an existing file keeps its mode when replaced.

A folder (a checkpoint, an exported Hub repo, a search index) is replaced the same way by
`replacing_folder`: written under `.NAME.partial` beside it, then swapped in. No platform renames a
folder onto a non-empty one, so the old folder is first renamed to `.NAME.old`, the new one put in
its place, and the old one deleted. A run killed between those renames leaves `.NAME.old` and no
`NAME`; the next replacement (or `recover_folder`) puts it back.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def folder_problem(path) -> str | None:
    """Why `path` cannot be used as an output folder (it, or a folder on the way to it, is a file), or None."""
    path = Path(path).expanduser()
    for place in (path, *path.parents):
        try:
            if place.is_dir():
                return None
            if place.exists() or place.is_symlink():
                kind = "a file" if place.exists() else "a link to nothing"
                on_the_way = "" if place == path else f", on the way to {path}"
                return (f"expected a folder, but {place} is {kind}{on_the_way}. Give the path of a new or existing "
                        "folder, or move that file away")
        except OSError:  # a folder we may not look into: writing there will say what is wrong
            return None
    return None


def require_folder(path) -> Path:
    """`path`, or NotADirectoryError saying which file stands where an output folder should be."""
    problem = folder_problem(path)
    if problem:
        raise NotADirectoryError(problem)
    return Path(path)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (not yet created); on success it replaces `path`,
    on any error it is removed. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise explain_disk_error(error, path) from error
        raise


@contextmanager
def replacing_folder(folder):
    """Yield an empty staging folder beside `folder`; when the block ends without error, the staging
    folder takes the place of `folder` (replacing it if it exists). On any error the staging folder is
    deleted and `folder` is left as it was. One writer per folder at a time: the staging name is fixed,
    so leftovers of a killed run are found (and cleaned) by the next one."""
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.partial"
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    shutil.rmtree(staging, ignore_errors=True)  # never complete: a killed run's leftover
    staging.mkdir()
    try:
        yield staging
        _swap_in(staging, folder)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error) and not isinstance(error, OSError):  # an OSError already names its file
            raise explain_disk_error(error, folder) from error
        raise


def set_aside_path(folder) -> Path:
    """Where `replacing_folder` keeps the previous `folder` while the new one is renamed into place."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.old"


def recover_folder(folder) -> Path | None:
    """Finish a replacement of `folder` that a killed run left half done: the previous folder, set aside
    with no new one in its place, is put back (and returned); a set-aside copy beside a complete new
    folder is deleted. None when there was nothing to put back."""
    folder, aside = Path(folder), set_aside_path(folder)
    if not aside.is_dir():
        return None
    if folder.exists():
        shutil.rmtree(aside)
        return None
    os.replace(aside, folder)
    logger.warning("%s: an earlier run was stopped while replacing this folder; its previous contents were put "
                   "back", folder)
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    aside = set_aside_path(folder)
    if folder.exists():
        os.replace(folder, aside)
    try:
        os.replace(staging, folder)
    except BaseException:
        if aside.exists() and not folder.exists():
            os.replace(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (fsynced before the rename). Returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically, newlines untranslated. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj):
    """numpy scalars/arrays and paths to plain Python; non-finite floats to None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path, obj) -> Path:
    """Write `obj` as indented, strict JSON (NaN/inf -> null, numpy -> Python) atomically.

    The whole text is serialised before the file is touched, so an unserialisable object raises
    TypeError and leaves any existing file as it was.
    """
    text = json.dumps(jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_json(path, what: str):
    """Parse a JSON file written by NearID; a clear error naming `what` and the file when it is broken."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}); it is damaged. Delete or restore it.") from None


def parse_json(text: str, where: str):
    """`json.loads(text)`; a ValueError naming `where` (a file, line or entry) when it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error})") from error


def write_csv(path, rows: Sequence[Mapping]) -> Path:
    """One CSV row per dict; columns are the union of keys in first-seen order (missing -> empty)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def is_disk_full(error: BaseException) -> bool:
    """True for the ways a full disk (or quota) surfaces: OSError ENOSPC/EDQUOT, or torch's writer."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos".
    return isinstance(error, RuntimeError) and "inline_container" in str(error) and "unexpected pos" in str(error)


def explain_disk_error(error: BaseException, path) -> OSError:
    """An OSError saying the disk holding `path` is full, with its free space and what to do."""
    free = disk_free_bytes(path)
    return OSError(errno.ENOSPC, f"The disk is full while writing {path} ({human_bytes(free)} free on that disk; "
                   f"{type(error).__name__}: {error}). Free some space or write to another disk, then run again; "
                   "files written before this one are complete.")


def disk_free_bytes(path) -> int:
    """Free bytes on the disk holding `path` (or its nearest existing parent folder)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def human_bytes(num_bytes: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} bytes"
