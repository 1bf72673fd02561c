"""One command-line convention for every NearID command (`train.py`, `evaluate.py`, `search.py`, ...).

- Arguments are dataclass fields declared with `option(default, help, ...)`: a field `batch_size`
  is the flag `--batch-size`; every flag has help text and, where it has one, its default; a
  boolean is `--flag` / `--no-flag`; a list takes several values or repeats (`--source a=A --source b=B`);
  numbers are checked against their bounds (and to be finite) when the command line is parsed, and
  output folders for a file standing in their place.
- Commands with modes (`evaluate.py nearid ...`) are subcommands built from the same dataclasses.
- The resolved arguments are saved as JSON beside the outputs (`save_arguments`).
- Datasets are `SRC` or `SRC@REVISION` (a Hub id pinned to a branch, tag or commit); named ones,
  such as distractor sources, are `NAME=SRC[@REVISION]` and parsed once, by `named_sources`.
- A user's mistake (a missing file, a bad value, an unreadable image, an unreachable Hub) ends the
  command with one short message that says what was expected, what was found and what to do, and
  exit status 1 (`user_errors`); an unknown flag gets the closest known one and status 2.
  Tracebacks are kept for bugs, or shown with `--debug` or NEARID_DEBUG=1.
- `--help` and argument errors answer without importing torch, transformers or datasets (seconds
  each): a command imports the modules that need them with `lazy_module`, which loads them when
  the run first uses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import gc
import importlib
import math
import os
import sys
import typing
from contextlib import contextmanager
from pathlib import Path

from nearid.hub_ids import split_revision
from nearid.io import atomic_write_json, folder_problem

REQUIRED = dataclasses.MISSING  # `option(REQUIRED, ...)`: the flag must be given
# The exceptions a user's input can cause; their messages are written for users.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def option(default=REQUIRED, help: str = "", *, choices=None, min=None, max=None, metavar=None,  # noqa: A002
           folder=False):
    """A dataclass field that is also a command-line flag (see the module docstring). `folder`: the value is a
    folder the command writes into, refused when parsed if a file stands there (or on the way to it)."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "metavar": metavar,
                "required": default is REQUIRED, "folder": folder}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=None if default is REQUIRED else default, metadata=metadata)


class Parser(argparse.ArgumentParser):
    """argparse with short errors: the message, the closest known flag, and where to find the rest."""

    def error(self, message):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flags = [flag for action in self._actions for flag in action.option_strings]
        for word in unknown:
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
                break
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help` to see every option.\n")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def add_arguments(parser: argparse.ArgumentParser, group_class) -> None:
    """Add one flag per field of the dataclass `group_class` to `parser`, in a titled group."""
    hints = typing.get_type_hints(group_class)
    title = (group_class.__doc__ or group_class.__name__).strip().splitlines()[0]
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(group_class):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        kind, is_list = _base_type(hints[field.name])
        kwargs = {"dest": field.name, "help": _help_text(field, kind, is_list)}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if kind is bool:
            action = group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, **kwargs)
            action.help = kwargs["help"]  # Python 3.11's action appends a second "(default: ...)" of its own
            continue
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        kwargs["type"] = _folder if meta.get("folder") else _checked(kind, meta.get("min"), meta.get("max"))
        if is_list:
            kwargs.update(nargs="+", action="extend")
        group.add_argument(flag, required=meta.get("required", False), default=_default(field), **kwargs)


def _base_type(annotation) -> tuple:
    """(element type, is a list) of a field annotation such as `int`, `str | None` or `list[str]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return args[0], True
    if args:  # Optional[X] / X | None
        return args[0], False
    return annotation, False


def _default(field):
    if field.default_factory is not dataclasses.MISSING:
        return None  # lists start empty; `action="extend"` appends to None as to a new list
    return field.default


def _help_text(field, kind, is_list) -> str:
    meta = field.metadata
    text = meta.get("help", "")
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if meta.get("required"):
        return f"{text} (required)"
    if kind is bool:
        return f"{text} (default: {'on' if default else 'off'})"
    if default not in (None, [], ""):
        shown = " ".join(map(str, default)) if is_list else default
        return f"{text} (default: {shown})"
    return text


def _checked(kind, low, high):
    """An argparse type that converts and checks bounds, naming the bound that was missed."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):  # NaN passes every bound check: compared, it is never out
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    if kind in (int, float):
        convert.__name__ = kind.__name__  # argparse names the type in its messages
        return convert
    return kind


def _folder(text):
    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


_folder.__name__ = "folder"  # argparse names the type in its messages


def build_parser(prog: str, description: str, groups: tuple = (), commands: dict | None = None) -> Parser:
    """A parser of `groups` (dataclasses), or with `commands` = {name: (help, description, groups)}."""
    parser = Parser(prog=prog, description=description, formatter_class=_formatter)
    if commands:
        sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")
        for name, (help_text, command_description, command_groups) in commands.items():
            command = sub.add_parser(name, help=help_text, description=command_description,
                                     formatter_class=_formatter)
            command.error = Parser.error.__get__(command)  # short errors in subcommands too
            _add_groups(command, command_groups)
    else:
        _add_groups(parser, groups)
    return parser


def _add_groups(parser, groups) -> None:
    for group_class in groups:
        add_arguments(parser, group_class)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also NEARID_DEBUG=1)")


def parse(parser: Parser, groups_by_command: dict | tuple, argv=None) -> tuple:
    """(command or None, {dataclass: instance}, debug) from `argv` (default sys.argv[1:])."""
    namespace = parser.parse_args(argv)
    command = getattr(namespace, "command", None)
    groups = groups_by_command[command] if command else groups_by_command
    values = vars(namespace)
    instances = {}
    for group_class in groups:
        fields = {f.name: values[f.name] for f in dataclasses.fields(group_class)}
        for f in dataclasses.fields(group_class):  # lists not given keep their default
            if fields[f.name] is None and f.default_factory is not dataclasses.MISSING:
                fields[f.name] = f.default_factory()
        try:
            instances[group_class] = group_class(**fields)
        except ValueError as error:  # a dataclass that checks its values in __post_init__
            parser.error(str(error))
    return command, instances, values.get("debug", False)


def save_arguments(path, command: str, *groups) -> Path:
    """Write the resolved arguments of a run as JSON: {"command": ..., field: value, ...}."""
    resolved = {"command": command}
    for group in groups:
        resolved.update(dataclasses.asdict(group))
    return atomic_write_json(path, resolved)


# --------------------------------------------------------------------------------------------------
# Datasets on the command line


@dataclasses.dataclass
class NearIDSources:
    """The NearID benchmark"""

    positives: str = option(REQUIRED, "positives dataset: Hub id (Aleksandar/NearID), save_to_disk folder or parquet; "
                                      "SRC@REVISION pins a Hub revision")
    source: list[str] = option(REQUIRED, "distractor source NAME=SRC[@REVISION], e.g. flux=Aleksandar/NearID-Flux; "
                                         "repeat for several", metavar="NAME=SRC")


def apply_published_splits(groups, positives, flags: typing.Mapping[str, str]) -> list:
    """With `positives` Aleksandar/NearID, each split flag of `flags` ({field: "test" or "val"}) that `groups`
    leave unset becomes the paper's published split file (nearid/splits), set in the groups so that the saved
    arguments show it. Other positives keep their defaults. Returns one line per flag set, for the log."""
    from nearid.data import split_files

    if not positives or not split_files.uses_published_splits(DatasetSource.parse(positives)):
        return []
    notes = []
    for group in groups:
        for field, split in flags.items():
            if hasattr(group, field) and getattr(group, field) is None:
                setattr(group, field, str(split_files.published_split_file(split)))
                notes.append(f"--{field.replace('_', '-')}: the published {split} split of "
                             f"{split_files.NEARID_POSITIVES} ({getattr(group, field)})")
    return notes


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """A dataset as given on the command line: a Hub id, folder or parquet file, and a Hub revision."""

    location: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "DatasetSource":
        """`SRC` or `SRC@REVISION`; an existing local path keeps any '@' in its name."""
        return cls(*split_revision(text))

    def __str__(self) -> str:
        return self.location if self.revision is None else f"{self.location}@{self.revision}"


def named_sources(texts, flag: str = "--source") -> dict:
    """{name: DatasetSource} from `NAME=SRC[@REVISION]` texts; bad syntax and repeated names are errors."""
    sources = {}
    for text in texts:
        name, sep, location = text.partition("=")
        if not (sep and name and location):
            raise ValueError(f"{flag} expects NAME=SRC (e.g. flux=Aleksandar/NearID-Flux), got {text!r}")
        if name in sources:
            raise ValueError(f"{flag} names {name!r} twice ({sources[name]} and {location}); give every source "
                             "its own name")
        sources[name] = DatasetSource.parse(location)
    return sources


# --------------------------------------------------------------------------------------------------
# Heavy modules, imported when first used


class lazy_module:  # noqa: N801 (used like a function: `readers = lazy_module("nearid.data.readers")`)
    """The module `name`, imported on first attribute access rather than now.

    Commands import the library modules that pull in torch, transformers or datasets this way, so
    that `--help` and argument errors answer at once; the run itself uses them as usual. So do the
    library modules that DataLoader worker processes import (`nearid.tokens`, `nearid.training_data`),
    for the few functions of theirs that need such a module, so that a spawned worker starts in a
    fraction of the time. Nothing is registered in sys.modules before that first use, so code that
    scans the loaded modules (torch and inspect do) never triggers an import half-way through another.
    The import runs with the garbage collector paused and, in NearID's own processes, everything alive after
    it is frozen out of the collector's reach (`collector_paused`, `freeze_heavy_imports`).
    """

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attribute: str):
        if self._module is None and self._name in sys.modules:  # imported already: nothing to pause for
            self._module = sys.modules[self._name]
        if self._module is None:
            with collector_paused(freeze=_freeze_heavy_imports):
                self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


# Whether `lazy_module` freezes what its imports make: only in a process that NearID runs as its program.
_freeze_heavy_imports = False


def freeze_heavy_imports() -> None:
    """Declare this process NearID's own (a command run as its program, the web app, the test suite): from now
    on `lazy_module` imports with `collector_paused(freeze=True)`. Never called for a library user's process,
    whose own objects would then be frozen too."""
    global _freeze_heavy_imports
    _freeze_heavy_imports = True


@contextmanager
def collector_paused(freeze: bool = False):
    """Python's cyclic garbage collector paused inside the block, which imports the heavy libraries.

    Importing torch, transformers and datasets makes about half a million objects, nearly all of which live as
    long as the process. While they accrue, the collector walks them all again at each of about a
    dozen full collections, and at each full collection after that. With `freeze`, what is alive after the
    block is moved out of its reach for good (`gc.freeze`), the garbage of before it collected first.
    Together, a third of the CPU time of `evaluate.py nearid` on the demo's data
    (benchmarks/bench_cli_startup.py). The cycles that the imports leave as garbage (about 10,000 objects for
    torch, transformers and datasets) are frozen with the rest: collecting them would cost as much as the
    imports' dozen collections did. Inside another such block, or where the collector is off, the block
    changes nothing.
    """
    if not gc.isenabled():
        yield
        return
    if freeze:
        gc.collect()  # the garbage of before the block is not frozen
    try:
        gc.disable()
        yield
    finally:
        if freeze:
            gc.freeze()
        gc.enable()


# --------------------------------------------------------------------------------------------------
# Errors


@contextmanager
def user_errors(debug: bool = False, hints: dict | None = None):
    """Turn a user's mistake into one short message on stderr and exit status 1.

    `hints` maps an exception class, or its dotted name ("module.Class", looked up only once its module
    is imported, so a command names it without importing it), to a sentence appended to its message
    (e.g. how to skip bad images). With `debug` or NEARID_DEBUG=1 the exception propagates with its
    traceback.
    """
    try:
        yield
    except USER_ERRORS as error:
        if debug or os.environ.get("NEARID_DEBUG") == "1":
            raise
        message = str(error).strip() or type(error).__name__
        if isinstance(error, OSError) and error.strerror and error.filename is None:
            message = error.strerror  # our own OSErrors: the message without "[Errno 28]"
        for error_class, hint in (hints or {}).items():
            if isinstance(error_class, str):
                module, _, class_name = error_class.rpartition(".")
                error_class = getattr(sys.modules.get(module), class_name, ())  # not imported: not raised
            if isinstance(error, error_class):
                message = f"{message.rstrip('.')}. {hint}"
                break
        print(f"error: {message}\n(run with --debug for the full traceback)", file=sys.stderr)
        raise SystemExit(1) from None
