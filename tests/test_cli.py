"""The one command-line convention: dataclass flags with help and bounds, NAME=SRC[@REVISION], saved
arguments, and readable --help for every command."""

import json
import re
from dataclasses import dataclass

import pytest

from nearid.commands import demo
from nearid.commands import evaluate
import nearid.hub
import nearid.commands.synthetic
from nearid.commands import train
from nearid.cli import REQUIRED, DatasetSource, build_parser, named_sources, option, parse, save_arguments


@dataclass
class Example:
    """Example options"""

    name: str = option(REQUIRED, "a required name")
    count: int = option(3, "how many", min=1, max=10)
    rate: float = option(0.5, "a rate", min=0.0)
    flag: bool = option(False, "a switch")
    items: list[str] = option([], "several values")


def parsed(argv):
    parser = build_parser("example", "An example.", groups=(Example,))
    return parse(parser, (Example,), argv)[1][Example]


def test_fields_become_hyphenated_flags_with_types_and_defaults():
    args = parsed(["--name", "x", "--count", "4", "--flag", "--items", "a", "b", "--items", "c"])
    assert (args.name, args.count, args.rate, args.flag, args.items) == ("x", 4, 0.5, True, ["a", "b", "c"])
    defaults = parsed(["--name", "y"])
    assert (defaults.count, defaults.flag, defaults.items) == (3, False, [])
    assert parsed(["--name", "y", "--no-flag"]).flag is False


@pytest.mark.parametrize("argv, says", [
    (["--count", "1"], "the following arguments are required: --name"),
    (["--name", "x", "--count", "0"], "argument --count: must be at least 1, got 0"),
    (["--name", "x", "--count", "11"], "argument --count: must be at most 10, got 11"),
    (["--name", "x", "--count", "two"], "argument --count: expected an integer, got 'two'"),
    (["--name", "x", "--cont", "2"], "unrecognized arguments: --cont 2 (did you mean --count?)"),
])
def test_mistakes_are_short_parse_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        parsed(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and says in error and len(error.strip().splitlines()) == 2, error


def test_named_sources_with_revisions_and_no_repeated_names():
    sources = named_sources(["flux=Aleksandar/NearID-Flux@v1", "sdxl=./data/sdxl"])
    assert sources == {"flux": DatasetSource("Aleksandar/NearID-Flux", "v1"), "sdxl": DatasetSource("./data/sdxl")}
    with pytest.raises(ValueError, match="expects NAME=SRC"):
        named_sources(["flux"])
    with pytest.raises(ValueError, match="names 'flux' twice"):
        named_sources(["flux=A", "flux=B"])
    assert str(DatasetSource.parse("owner/name@abc123")) == "owner/name@abc123"


def test_resolved_arguments_are_saved(tmp_path):
    path = save_arguments(tmp_path / "args.json", "example", parsed(["--name", "x"]))
    assert json.loads(path.read_text()) == {"command": "example", "name": "x", "count": 3, "rate": 0.5,
                                            "flag": False, "items": []}


@pytest.mark.parametrize("command, argv", [
    (train.main, ["--help"]),
    (demo.main, ["--help"]),
    (nearid.commands.synthetic.main, ["--help"]),
    (nearid.hub.main, ["push", "--help"]),
    *[(evaluate.main, [mode, "--help"]) for mode in evaluate.MODES],
])
def test_every_command_has_readable_help(command, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        command(argv)
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith("usage: ")
    options = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    for entry in options[1:]:
        flag = entry.split()[0].rstrip(",")
        words = " ".join(entry.split()[1:])
        assert words and entry.count("(default:") <= 1, f"{flag}: {entry!r}"
    helps = [" ".join(entry.split()[1:]) for entry in options[1:]]
    assert len(helps) == len(set(helps))  # no help text reused for another flag
    assert "SPEC" not in text and "--debug" in text


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_that_is_not_finite_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        parsed(["--name", "x", f"--rate={value}"])
    assert f"argument --rate: expected a finite number, got {value!r}" in capsys.readouterr().err


HEAVY_MODULES = ("torch", "transformers", "datasets", "faiss", "matplotlib", "scipy", "sklearn")
# Runs a script as `python SCRIPT ARGS...` does, then prints its exit status (None: it returned), which heavy
# modules it imported, how many objects it froze out of the garbage collector's reach and whether the collector is on.
RUN_AND_LIST_IMPORTS = """
import gc, json, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
code = None
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    code = done.code
print(json.dumps({"exit": code, "imported": [m for m in %r if m in sys.modules], "frozen": gc.get_freeze_count(),
                  "collector": gc.isenabled()}))
""" % (HEAVY_MODULES,)


@pytest.mark.parametrize("argv", [["train.py", "--help"], ["evaluate.py", "--help"], ["evaluate.py", "score", "--help"],
                                  ["search.py", "index", "--help"], ["demo.py", "--help"],
                                  ["nearid/commands/synthetic.py", "--help"],
                                  ["evaluate.py", "nearid", "--batch-size", "0"], ["train.py", "--no-such-flag"]])
def test_help_and_argument_errors_import_no_heavy_module(argv):
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST_IMPORTS, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit"] == (0 if "--help" in argv else 2), done.stderr
    assert result["imported"] == []


def test_the_commands_lists_of_kinds_and_modes_are_the_librarys():
    from nearid import numerics, options, scorers
    from nearid import search as gallery
    from nearid.commands import search

    assert set(options.BASELINE_KINDS) == set(scorers.SCORER_KINDS) - {"nearid"}
    assert search.COMBINE == gallery.COMBINE and set(numerics.WEIGHT_DTYPES) == set(scorers.DTYPES)


def test_a_command_run_from_a_fresh_interpreter_loads_its_lazy_modules(tmp_path):
    """The lazily imported library works when nothing imported it before (as in the tests' own process), and
    scoring published score files loads no model code (transformers) and no dataset library."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    ratings = REPO_ROOT / "tests" / "data" / "dreambench_plus"
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST_IMPORTS, "evaluate.py", "dreambench", "--ratings", str(ratings),
                           "--scores-from", "data_nearid_rating", "--output-dir", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit"] == 0 and not {"transformers", "datasets"} & set(result["imported"]), result
    assert json.loads((tmp_path / "dreambench_results.json").read_text())["metrics"]["mh_object"] > 0.5
    # A command run as its program froze everything alive after its heavy imports (numpy, scipy and the library's
    # modules here), and left the collector on.
    assert result["frozen"] > 10_000 and result["collector"], result


def test_a_library_users_process_is_never_frozen(tmp_path):
    """The same run through the Python API of the command, as a user's program would call it: its lazy imports
    pause the collector but freeze nothing, so no object of the user's is kept from it."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    program = (
        "import gc, json, sys; from nearid.commands import evaluate\n"
        "evaluate.main(sys.argv[1:]); print(json.dumps({'frozen': gc.get_freeze_count(), 'collector': gc.isenabled()}))")
    ratings = REPO_ROOT / "tests" / "data" / "dreambench_plus"
    done = subprocess.run([sys.executable, "-c", program, "dreambench", "--ratings", str(ratings),
                           "--scores-from", "data_nearid_rating", "--output-dir", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"frozen": 0, "collector": True}
    assert (tmp_path / "dreambench_results.json").is_file()


def frozen(obj) -> bool:
    """Whether `obj` was moved out of the garbage collector's reach (gc.freeze): tracked, in none of its
    generations."""
    import gc

    return gc.is_tracked(obj) and not any(tracked is obj for tracked in gc.get_objects())


def test_the_collector_is_paused_in_the_block_and_frozen_after_it_only_when_asked():
    import gc

    from nearid.cli import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        paused_only = []
    assert gc.isenabled() and not frozen(paused_only)
    with collector_paused(freeze=True):
        made = []
        with collector_paused(freeze=True):  # inside another block: changes nothing
            made_inside = []
        assert not gc.isenabled() and not frozen(made_inside)
    assert gc.isenabled() and frozen(made) and frozen(made_inside)


def test_garbage_of_before_the_block_is_collected_not_frozen():
    import weakref

    from nearid.cli import collector_paused

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle
    alive = weakref.ref(cycle)
    del cycle  # garbage only the collector can free
    assert alive() is not None
    with collector_paused(freeze=True):
        pass
    assert alive() is None


def test_a_module_imported_already_is_taken_without_a_collection():
    import gc

    from nearid.cli import lazy_module

    collections = gc.get_stats()[2]["collections"]
    assert lazy_module("json").dumps([]) == "[]"
    assert gc.get_stats()[2]["collections"] == collections


def test_a_failed_import_in_the_block_turns_the_collector_back_on():
    import gc

    from nearid.cli import lazy_module

    with pytest.raises(ModuleNotFoundError):
        lazy_module("nearid.no_such_module").anything
    assert gc.isenabled()


def imported_modules(path) -> list:
    """The modules a Python file imports by name (`import x`, `from x import y`) and lazily (`lazy_module("x")`)."""
    import ast

    tree = ast.parse(path.read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", None) == "lazy_module" and isinstance(node.args[0], ast.Constant)]
    return imported


def test_no_command_imports_another():
    """A command is parsing plus calls into the library; what two commands share lives in the package
    (demo.py, which runs the commands, aside)."""
    from pathlib import Path

    import nearid.commands

    folder = Path(nearid.commands.__file__).parent
    for path in sorted(folder.glob("*.py")):
        if path.stem in ("demo", "console", "__init__"):
            continue
        assert not [name for name in imported_modules(path) if name.startswith("nearid.commands")], path.name


def test_the_library_imports_no_command():
    """The programs behind the commands (nearid.evaluation, nearid.training, ...) are library: they never reach
    back into a command for its arguments or steps."""
    from pathlib import Path

    import nearid

    package = Path(nearid.__file__).parent
    for path in sorted(package.rglob("*.py")):
        if package / "commands" in path.parents or path.name == "__main__.py":  # `python -m` entry points are commands
            continue
        assert not [name for name in imported_modules(path) if name.startswith("nearid.commands")], path
