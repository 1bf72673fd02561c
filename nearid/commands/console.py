"""The console scripts `nearid-train`, `nearid-evaluate`, `nearid-search` and `nearid-demo`.

The scripts of a clone (`python train.py`, ...) run the same functions. A console script exits with what
its function returns, and `sys.exit` of a dict prints it and exits with status 1. So these run a
command's `main()` and return 0 instead of its results; a user error still exits with status 1
(`nearid.cli.user_errors`).
"""

import importlib

from nearid.cli import freeze_heavy_imports


def run(command: str) -> int:
    """`nearid.commands.<command>`'s `main()` as the program of this process (its heavy imports frozen,
    `nearid.cli.freeze_heavy_imports`); 0 for a run that returned."""
    freeze_heavy_imports()
    importlib.import_module(f"nearid.commands.{command}").main()
    return 0


def train() -> int:
    """`nearid-train`, the same program as `python train.py` in a clone."""
    return run("train")


def evaluate() -> int:
    """`nearid-evaluate`, the same program as `python evaluate.py` in a clone."""
    return run("evaluate")


def search() -> int:
    """`nearid-search`, the same program as `python search.py` in a clone."""
    return run("search")


def demo() -> int:
    """`nearid-demo`, the same program as `python demo.py` in a clone."""
    return run("demo")
