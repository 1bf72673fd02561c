"""The files of one run: `RunOutputs` (stale files of the previous run removed, results JSON last)."""

import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

from nearid.io import atomic_write_json, require_folder


class RunOutputs:
    """The files one run writes into a folder, so that the folder never mixes two runs unnoticed.

    On creation, the previous run's results file of the same name is removed first (it vouches for
    the files beside it), then every file it listed, so no stale output survives a rerun (say, a
    method no longer evaluated). Files are written atomically. Optional steps (plots, a model-card
    update) that fail become warnings instead of failing the run: the metrics are never lost. The
    results JSON, written last by `finish`, lists every file the run wrote and every warning; its
    presence means the run finished.
    """

    def __init__(self, folder, results_name: str, *, always: Sequence[str] = (), keep_previous: bool = False):
        """always: files or folders the run writes whatever happens (a training run's checkpoints):
        removed too, even when no results file lists them (the previous run stopped before its end).
        keep_previous: leave the previous run's outputs (a resumed run continues them)."""
        self.folder, self.results_name = require_folder(folder), results_name
        self.files, self.warnings = [], []
        if keep_previous:
            return
        previous = self.folder / results_name
        listed = []
        if previous.is_file():
            try:
                listed = json.loads(previous.read_text(encoding="utf-8")).get("files", [])
            except (ValueError, AttributeError):
                listed = []
            previous.unlink()
        for name in listed:
            path = (self.folder / name).resolve()
            if path.is_relative_to(self.folder.resolve()) and path.is_file():
                path.unlink()
        for name in always:
            path = self.folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        """Where output `name` goes, recorded as one of this run's files."""
        self.files.append(name)
        return self.folder / name

    def optional(self, what: str, step, *args) -> bool:
        """Run `step(*args)`; on any failure record and print a warning naming `what`, and go on."""
        try:
            step(*args)
            return True
        except Exception as error:  # a plot or card failure must not cost the computed results
            self.warn(f"{what} failed ({type(error).__name__}: {error}); the results are written without it")
            return False

    def warn(self, warning: str) -> None:
        """Print `warning` and record it in the results JSON."""
        self.warnings.append(warning)
        print(f"warning: {warning}", file=sys.stderr)

    def finish(self, document: dict) -> Path:
        """Write the results JSON last, with this run's files and warnings."""
        document = {**document, "files": list(dict.fromkeys(self.files)), "warnings": list(self.warnings)}
        return atomic_write_json(self.folder / self.results_name, document)
