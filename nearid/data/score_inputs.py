"""Users' generated images and their references, for `evaluate.py score`.

`score_items_from_layout` / `score_items_from_subject_folders` / `read_score_metadata` turn users'
generated images (a mirrored layout, the DreamBooth layout of reference and generation folders per
subject, or a CSV/JSON/JSONL metadata file) into `ScoreItem`s: a generated image, its reference(s),
subject and method.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nearid.data.dreambench_files import dreambench_methods, dreambench_pairs_and_others
from nearid.images import find_images
from nearid.io import parse_json

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
    pairs, others = dreambench_pairs_and_others(base, method)
    for key, src, tgt in pairs:
        rel = tgt.relative_to(base / method / "tgt_image")
        subject = rel.parts[0] if len(rel.parts) > 1 else key  # <subject>/<prompt>.png, else the file itself
        items.append(ScoreItem(method, subject, tgt.relative_to(root).as_posix(),
                               (src.relative_to(root).as_posix(),), root, str(tgt)))
    return items, others


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


# --------------------------------------------------------------------------------------------------
# Metadata files


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
        return [(f"{path} line {n}", parse_json(line, f"{path} line {n}"))
                for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    entries = parse_json(text, str(path)) if text.strip() else []
    if not isinstance(entries, list):
        raise ValueError(f"metadata file {path} holds a JSON {type(entries).__name__}; expected a list of "
                         'objects like {"generated": "gen.png", "reference": ["ref1.png", "ref2.png"]}')
    return [(f"{path} entry {n}", entry) for n, entry in enumerate(entries, start=1)]


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
