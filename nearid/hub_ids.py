"""What a Hugging Face Hub repo id looks like, in one place: model loading, dataset reading and the
model card all tell a Hub id from a local path with these.

A repo id is `owner/name`; a dataset may also be a canonical `name` without owner. Each part starts
with a letter or digit and holds letters, digits, `_`, `.` and `-`, never `..`. A string that also
names an existing local path is a path, never a Hub id: a folder called `owner/name` in the working
folder is read from disk, as `from_pretrained` does.

A model or dataset given on the command line may pin a Hub revision as `SRC@REVISION`
(`split_revision`).
"""

from __future__ import annotations

import re
from pathlib import Path

_PART = r"[A-Za-z0-9][\w.-]*"
_NAMESPACED = re.compile(rf"{_PART}/{_PART}")
_NAMESPACE_OPTIONAL = re.compile(rf"(?:{_PART}/)?{_PART}")


def looks_like_hub_id(text, *, namespace: bool = True) -> bool:
    """`text` has the form of a Hub repo id: `owner/name`, or also a lone `name` when `namespace` is False."""
    pattern = _NAMESPACED if namespace else _NAMESPACE_OPTIONAL
    return isinstance(text, str) and bool(pattern.fullmatch(text)) and ".." not in text


def is_hub_id(text, *, namespace: bool = True) -> bool:
    """`text` has the form of a Hub repo id and is not an existing local path."""
    return looks_like_hub_id(text, namespace=namespace) and not Path(text).expanduser().exists()


def split_revision(text: str) -> tuple:
    """`SRC@REVISION` -> (SRC, REVISION); `SRC` -> (SRC, None). An existing local path keeps any '@' in its
    name, and so does a text whose '@' is followed by a folder ('dir@2x/file')."""
    location, sep, revision = text.rpartition("@")
    if not sep or Path(text).expanduser().exists() or "/" in revision or not location:
        return text, None
    return location, revision
