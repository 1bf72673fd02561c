"""What a Hugging Face Hub repo id looks like, in one place: model loading, dataset reading and the
model card all tell a Hub id from a local path with these.

A repo id is `owner/name`; a dataset may also be a canonical `name` without owner. Each part starts
with a letter or digit and holds letters, digits, `_`, `.` and `-`, never `..`. A string that also
names an existing local path is a path, never a Hub id: a folder called `owner/name` in the working
folder is read from disk, as `from_pretrained` does.
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
