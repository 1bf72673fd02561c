"""The package installs: a wheel built from the clone, installed without the clone, works from any folder.

The wheel is built from a copy of the files it packages and installed with `pip install --target` into
a temporary folder (no dependencies: the test venv's own site-packages provides them), then used from
another folder with only that folder and the venv's site-packages on the path, as after `pip install .`.
"""

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PACKAGED = ("pyproject.toml", "README.md", "configuration_nearid.py", "modeling_nearid.py",
            "image_processing_nearid.py")
CONSOLE_SCRIPTS = {f"nearid-{name}": f"nearid.commands.console:{name}" for name in ("train", "evaluate", "search",
                                                                                      "demo")}
RATINGS = REPO_ROOT / "tests" / "data" / "dreambench_plus"


def pip(*args, cwd) -> str:
    """pip's output (stdout and stderr)."""
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args], cwd=cwd,
                          check=True, capture_output=True, text=True)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, install folder, a folder elsewhere, environment of an installed package); the wheel build's output
    is in `build.log` beside the wheel folder."""
    import shutil

    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO_ROOT / "nearid", source / "nearid", ignore=shutil.ignore_patterns("__pycache__"))
    for name in PACKAGED:
        shutil.copyfile(REPO_ROOT / name, source / name)
    build = pip("wheel", "--verbose", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "wheel"),
                str(source), cwd=root)
    (root / "build.log").write_text(build)
    wheel = next((root / "wheel").glob("nearid-*.whl"))
    target = root / "site"
    pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=root)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    # The installed package and the venv's dependencies only: no clone on the path.
    env = {"PATH": f"{target / 'bin'}:/usr/bin:/bin", "PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}",
           "HF_HUB_OFFLINE": "1", "HOME": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    return wheel, target, elsewhere, env


def run(command, installed, **kwargs):
    _, _, elsewhere, env = installed
    return subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def test_wheel_declares_the_console_scripts(installed):
    wheel = installed[0]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(entry_points).decode()
    section = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    declared = dict(line.replace(" ", "").split("=", 1) for line in section.splitlines() if "=" in line)
    assert declared == CONSOLE_SCRIPTS
    # The package, its commands, the three remote-code modules and the published splits are in the wheel.
    for name in ("nearid/__init__.py", "nearid/commands/evaluate.py", "nearid/commands/console.py",
                 "modeling_nearid.py", "configuration_nearid.py", "image_processing_nearid.py",
                 "nearid/splits/test.json", "nearid/splits/val.json", "nearid/splits/PROVENANCE.md"):
        assert name in names
    # Every subpackage of the clone, as pyproject.toml lists them one by one.
    packages = {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "nearid").rglob("__init__.py")}
    assert packages <= set(names), sorted(packages - set(names))
    # The root scripts stay in the clone: `evaluate` would shadow other packages' modules once installed.
    assert not {"train.py", "evaluate.py", "search.py", "demo.py"} & set(names)
    # setuptools finds nothing importable left out of pyproject.toml's packages (a data folder counts).
    assert "absent from the `packages` configuration" not in (wheel.parent.parent / "build.log").read_text()


def test_installed_package_imports_from_another_folder(installed):
    _, target, elsewhere, _ = installed
    probe = """
import json, modeling_nearid, nearid
from nearid import card, hub, resources
from nearid.data import split_files
print(json.dumps({
    "nearid": nearid.__file__, "modeling": modeling_nearid.__file__, "clone": str(resources.checkout_root()),
    "remote_code": [str(resources.remote_code_file(n[:-3])) for n in resources.REMOTE_CODE_FILES],
    "splits": {name: len(split_files.published_split(name)) for name in ("train", "val", "test")},
    "citation": card.readme_section("Citation"),
}))
"""
    result = run([sys.executable, "-c", probe], installed)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    for path in (found["nearid"], found["modeling"], *found["remote_code"]):
        assert Path(path).resolve().is_relative_to(target.resolve()), path
    assert found["clone"] == "None"
    assert found["splits"] == {"train": 18786, "val": 100, "test": 500}
    # The card's fixed prose comes from the README the package carries in its metadata.
    assert "@article" in found["citation"]


def test_installed_command_runs_as_a_module(installed):
    _, target, _, _ = installed
    result = run([sys.executable, "-m", "nearid.commands.evaluate", "--help"], installed)
    assert result.returncode == 0, result.stderr
    assert "table1" in result.stdout and "retrieval" in result.stdout
    for script, function in CONSOLE_SCRIPTS.items():  # pip wrote the console scripts, calling these functions
        module, name = function.split(":")
        assert f"from {module} import {name}" in (target / "bin" / script).read_text()


def test_console_script_exits_with_status_0_after_a_run(tmp_path, monkeypatch):
    """A console script exits with its function's return value; `main` returns results, which would exit 1."""
    from nearid.commands import console

    out = tmp_path / "dreambench"
    monkeypatch.setattr(sys, "argv", ["nearid-evaluate", "dreambench", "--ratings", str(RATINGS), "--scores-from",
                                      "data_nearid_rating", "--output-dir", str(out)])
    assert console.evaluate() == 0
    assert json.loads((out / "dreambench_results.json").read_text())["benchmark"] == "dreambench"
