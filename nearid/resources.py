"""Files NearID reads at run time, found the same way in a clone and in an installed package.

- `PUBLISHED_SPLITS`: the folder of the paper authors' NearID split files (package data, with
  their PROVENANCE.md).
- `REMOTE_CODE_FILES` and `remote_code_file(module)`: the Hub's remote-code modules (`modeling_nearid.py`, ...), which sit at
  the root of a clone and install as top-level modules.
- `readme_text()`: the repository's README.md (the model card whose fixed prose every exported card
  copies): the clone's file, or the copy an installed package carries as its long description.
- `checkout_root()`: the clone the package runs from, or None when it is installed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PUBLISHED_SPLITS = PACKAGE_DIR / "splits"
REMOTE_CODE_FILES = ("configuration_nearid.py", "modeling_nearid.py", "image_processing_nearid.py")
DISTRIBUTION = "nearid"
_NAME_LINE = re.compile(rf"""^name\s*=\s*["']{DISTRIBUTION}["']""", re.M)  # pyproject.toml's [project] name


def checkout_root() -> Path | None:
    """The root of the clone this package runs from (also under `pip install -e`), or None when installed.

    A clone is recognised by its own pyproject.toml beside the package, not by any folder name.
    """
    root = PACKAGE_DIR.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and _NAME_LINE.search(pyproject.read_text(encoding="utf-8")):
        return root
    return None


def remote_code_file(module: str) -> Path:
    """The source file of the remote-code module `module` (e.g. "modeling_nearid"), wherever it is imported from."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise FileNotFoundError(f"the remote-code module {module} is not importable as a .py file (found "
                                f"{spec.origin if spec else 'nothing'}); reinstall nearid (pip install .) or run "
                                "from the repository root")
    return Path(spec.origin)


def readme_text() -> str:
    """The text of the repository's README.md."""
    root = checkout_root()
    if root is not None:
        return (root / "README.md").read_text(encoding="utf-8")
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        text = metadata(DISTRIBUTION).get_payload()
    except PackageNotFoundError:
        text = None
    if not text:
        raise FileNotFoundError(f"cannot find NearID's README.md: {PACKAGE_DIR} is not in a clone of the repository, "
                                f"and no installed '{DISTRIBUTION}' distribution carries it. Install the package "
                                "(pip install .) or run from a clone")
    return text
