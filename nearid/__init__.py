"""NearID: identity embeddings that look past the background (arXiv 2604.01973).

The package behind `train.py`, `evaluate.py` and `demo.py`, one module per role (see the repository
layout in docs/development.md). From Python, start with `nearid.IdentityScorer` (`nearid.api`).
"""

__version__ = "0.1.0"

import importlib.util
from pathlib import Path

__all__ = ["IdentityScorer"]

MODEL_CODE_MODULES = ("configuration_nearid", "modeling_nearid", "image_processing_nearid")


def _check_model_code_is_ours():
    """The three model-code modules must be the ones beside this package. Python looks in the working
    folder first (`python -c`, `python -m`, notebooks), so started inside a downloaded model folder,
    `import modeling_nearid` would run that folder's copy: refuse before anything imports it."""
    home = Path(__file__).resolve().parent.parent
    for name in MODEL_CODE_MODULES:
        spec = importlib.util.find_spec(name)  # finds the file without running it
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin != home / f"{name}.py":
            raise ImportError(
                f"{name} would be imported from {origin}, not from this NearID installation ({home / name}.py). "
                "Python looks in the current folder first, and a model folder's own copy is never run: start "
                "Python from another folder (a model folder is passed by its path).")


_check_model_code_is_ours()


def __getattr__(name):
    # Lazy, so that `import nearid.metrics` (or a command's --help) does not load torch and transformers.
    if name == "IdentityScorer":
        from nearid.api import IdentityScorer

        return IdentityScorer
    raise AttributeError(f"module 'nearid' has no attribute {name!r}")
