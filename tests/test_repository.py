"""The checkout itself: what the commands write by default, and where the docs' examples write, is
ignored by git, so a first run leaves `git status` clean."""

import re
import shutil
import subprocess

import pytest

from nearid.commands import demo, evaluate, search, train
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(),
                                reason="needs a git checkout")


def documented_output_folders() -> set:
    """The folders given to --output-dir / --index-dir / --cache-dir in README.md and docs/*.md."""
    found = set()
    for page in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for folder in re.findall(r"--(?:output|cache)-dir[ =]([\w./-]+)", page.read_text()):
            if "$" not in folder and not folder.startswith(("/", "DIR", "OUTPUT")):
                found.add(folder.rstrip("/"))
    return found


def default_output_folders() -> set:
    return {evaluate.OutputArguments().output_dir, evaluate.EmbeddingArguments().cache_dir,
            search.SearchOutputArguments().output_dir, train.TrainingArguments().output_dir,
            demo.DemoArguments().output_dir}


def ignored(path: str) -> bool:
    probe = f"{path}/some_output.json"
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO_ROOT).returncode == 0


def test_default_and_documented_output_folders_are_ignored_by_git():
    folders = default_output_folders() | documented_output_folders()
    assert documented_output_folders(), "no --output-dir example found in README.md or docs/"
    assert [folder for folder in sorted(folders) if not ignored(folder)] == []
