"""NearID: identity embeddings that look past the background (arXiv 2604.01973).

The package behind `train.py`, `evaluate.py` and `demo.py`, one module per role (see the README's
repository layout). From Python, start with `nearid.IdentityScorer` (`nearid.api`).
"""

__version__ = "0.1.0"
__all__ = ["IdentityScorer"]


def __getattr__(name):
    # Lazy, so that `import nearid.metrics` (or a command's --help) does not load torch and transformers.
    if name == "IdentityScorer":
        from nearid.api import IdentityScorer

        return IdentityScorer
    raise AttributeError(f"module 'nearid' has no attribute {name!r}")
