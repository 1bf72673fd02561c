"""The results JSON of a run: where its numbers came from, and what it left out.

`provenance` records the model, datasets, split file, package versions, git state, date and command;
`results_document` lays out one (benchmark, scorer) run's metrics, left-out items (with the short
reasons of `skip_reason`) and counts. Files are written by `nearid.reports.run_outputs.RunOutputs`.
"""

import datetime
import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nearid.resources import PACKAGE_DIR

# Packages whose versions go into every results file (distribution names, PIL is "pillow").
PROVENANCE_PACKAGES = {"torch": "torch", "transformers": "transformers", "datasets": "datasets",
                       "huggingface_hub": "huggingface_hub", "numpy": "numpy", "PIL": "pillow"}
REPO_DIR = PACKAGE_DIR.parent  # the root of a clone (git_state checks there is one)


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """{"commit": HEAD sha or None, "dirty": tracked files modified (None without a checkout)}.

    Only a checkout whose top level is this file's folder (the repo root) counts, so a copy of the
    repo inside another git repository does not report that repository's commit.
    """
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != REPO_DIR:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sha256(path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def provenance(model: dict, datasets: list[dict], split_file: str | None = None,
               extra: dict | None = None) -> dict:
    """Where a result came from.

    Args:
        model: e.g. {"name_or_path", "revision", "scorer", "dtype"}; datasets: one dict per dataset
            (e.g. {"repo_id", "revision", "split"}); split_file: the sample split used, if any (its
            sha256 is recorded when it exists); extra: anything else (device, batch size, ...).

    Returns:
        {"model", "datasets", "split_file", "split_file_sha256", "versions" (python, nearid and
        `PROVENANCE_PACKAGES`, None if not installed), "git" ({"commit", "dirty"}),
        "date_utc" (ISO 8601), "command" (sys.argv), "platform", "extra"}. No hostname.
    """
    from nearid import __version__

    # The package's own version identifies the code where there is no git checkout (an installed package).
    versions = {"python": platform.python_version(), "nearid": __version__}
    versions.update({name: _version(dist) for name, dist in PROVENANCE_PACKAGES.items()})
    return {
        "model": dict(model),
        "datasets": [dict(d) for d in datasets],
        "split_file": None if split_file is None else str(split_file),
        "split_file_sha256": None if split_file is None else _sha256(split_file),
        "versions": versions,
        "git": git_state(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "platform": platform.platform(),
        "extra": dict(extra or {}),
    }


def _counts(metrics: Mapping, prefix: str = "") -> dict:
    """Integer `n_*` entries of a (possibly nested) metrics dict, nested keys joined by '/'."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(_counts(v, f"{prefix}{k}/"))
        elif str(k).split("/")[-1].startswith("n_") and isinstance(v, (int, np.integer)):
            out[f"{prefix}{k}"] = int(v)
    return out


# Short reasons for what a run left out, found by the phrases of the messages that say it (the decode's, in
# image_processing_nearid.py, and `nearid.images.find_images`'); the full message stays with each item.
SKIP_REASONS = (
    ("no such image file", "missing file"),
    ("cannot read image file", "unreadable"),
    ("could not decode", "unreadable"),
    ("not an image format", "not an image"),
    ("above the limit", "too large"),
    ("decompression-bomb limit", "too large"),
    ("it has no pixels", "no pixels"),
    ("neither bytes nor a path", "empty cell"),
    ("the mtg oracle needs both masks", "missing mask"),
    ("not in a <subject>/ folder", "outside a subject folder"),
)


def skip_reason(message: str) -> str:
    """The short reason of one left-out item's message, e.g. "unreadable" for "Could not decode image file
    'a.png' (12 bytes): ..."; a message that is already short and names no file is its own reason."""
    lower = message.lower()
    for phrase, reason in SKIP_REASONS:
        if phrase in lower:
            return reason
    return message if len(message) <= 48 and "'" not in message and "/" not in message else "other"


def skipped_by_reason(skipped: Sequence[Mapping]) -> dict:
    """{short reason: count} of left-out items ({"reason": message, ...}), the most frequent first."""
    counts: dict = {}
    for item in skipped:
        reason = skip_reason(item["reason"])
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def results_document(benchmark: str, scorer: dict, metrics: dict, provenance: dict,
                     skipped: list[dict], notes: Mapping | None = None) -> dict:
    """The results JSON of one (benchmark, scorer) run, in a fixed layout.

    Returns {"benchmark", "scorer", "metrics", "skipped" (one dict per left-out item, each with a
    "reason", its full message), "counts" ({"n_skipped", "skipped_by_reason" (short reasons,
    `skip_reason`), plus every integer `n_*` of `metrics`, nested keys joined by '/'}), "provenance"},
    and "notes" (metric key -> what it means) when given.
    """
    bad = [s for s in skipped if "reason" not in s]
    if bad:
        raise ValueError(f"every skipped item needs a 'reason'; got {bad[:3]}")
    by_reason = skipped_by_reason(skipped)
    return {
        "benchmark": benchmark,
        "scorer": dict(scorer),
        "metrics": dict(metrics),
        "skipped": [dict(s) for s in skipped],
        "counts": {"n_skipped": len(skipped), "skipped_by_reason": by_reason, **_counts(metrics)},
        "provenance": provenance,
        **({"notes": dict(notes)} if notes else {}),
    }
