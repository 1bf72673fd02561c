"""How fast the commands start, and what Python's garbage collector costs them.

1. `--help` against loading the whole program (what `--help` cost while the commands imported torch,
   transformers and datasets up front): per command, the best of --repeats wall times of
   `python SCRIPT --help`, of `python -c "<import the command and every library module its run loads>"`, and
   their ratio. Goal: `--help` (and argument errors) in under 1.5 s.
2. The collector: CPU seconds of whole runs, `python demo.py` (the main job: synthetic data, training,
   evaluation and search in one process) and then `python evaluate.py nearid` on the demo's data and model,
   as the commands run them (heavy imports with the collector paused, then frozen out of its reach:
   nearid.cli.collector_paused) against the same runs with the collector left as Python sets it; the best of
   --run-repeats each, runs of the two kinds in turn, and their ratio.

Usage: python benchmarks/bench_cli_startup.py [--repeats 5] [--run-repeats 3]
           [--output benchmarks/results/cli_startup.txt]
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import best_time, cpu_model, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# What each command's run loads: its command module, then the lazily loaded library modules.
PROGRAMS = {
    "train.py": ("checkpoints", "models", "training.inputs", "training.loop", "training.release", "training.state",
                 "training.tracking"),
    "evaluate.py": ("data", "evaluation", "images", "scorers", "store"),
    "search.py": ("data", "images", "scorers", "search"),
    "demo.py": ("data", "evaluation", "images", "scorers", "store", "hub", "models"),
}


# A command run as `python SCRIPT` runs it, with nearid.cli's pause of the collector replaced by a block that
# does nothing: the collector as Python sets it.
UNTOUCHED = """import contextlib, sys
import nearid.cli
nearid.cli.collector_paused = lambda freeze=False: contextlib.nullcontext()
sys.argv = sys.argv[1:]
from nearid.commands.console import run
sys.exit(run(sys.argv[0].removesuffix(".py")))
"""


def run_quietly(argv):
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def cpu_of_run(argv) -> float:
    """CPU seconds (user and system) of the process `argv` and its children, run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_quietly(argv)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def collector_lines(folder: Path, repeats: int) -> list:
    """The table of part 2: per run, the best CPU seconds as the commands run and untouched, and their ratio.
    Every run writes into folders of its own: none finds another's outputs or embeddings to reuse."""
    demo = folder / "demo-0-as-run" / "demo_outputs"  # the data and model of the evaluate runs

    def demo_run(name):
        return ["demo.py", "--output-dir", str(folder / name / "demo_outputs")]

    def evaluate_run(name):
        return ["evaluate.py", "nearid", "--model", str(demo / "nearid-untrained"),
                "--positives", str(demo / "synthetic" / "positives"), "--source", f"flux={demo / 'synthetic' / 'flux'}",
                "--device", "cpu", "--output-dir", str(folder / name / "out"), "--cache-dir", str(folder / name / "cache")]

    lines = [f"{'run (CPU s, best of ' + str(repeats) + ')':<28} {'as run':>8} {'untouched':>10} {'ratio':>6}"]
    for label, arguments in (("demo.py", demo_run), ("evaluate.py nearid", evaluate_run)):
        as_run, untouched = [], []
        for index in range(repeats):  # in turn: a change of the machine's load falls on both kinds
            as_run.append(cpu_of_run([sys.executable, *arguments(f"{label[:4]}-{index}-as-run")]))
            untouched.append(cpu_of_run([sys.executable, "-c", UNTOUCHED, *arguments(f"{label[:4]}-{index}-untouched")]))
        lines.append(f"{label:<28} {min(as_run):>8.2f} {min(untouched):>10.2f} {min(as_run) / min(untouched):>6.2f}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-repeats", type=int, default=3, help="runs of each kind in part 2")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "cli_startup.txt"))
    args = parser.parse_args(argv)
    lines = [f"python {sys.version.split()[0]}, CPU: {cpu_model()}, {os.cpu_count()} cores, best of {args.repeats}",
             f"{'command':<12} {'--help (s)':>10} {'whole program import (s)':>25} {'ratio':>6}"]
    for script, modules in PROGRAMS.items():
        # The library first: the command then finds these modules loaded instead of registering lazy ones.
        command = "; ".join(f"import nearid.{m}" for m in modules) + f"; import nearid.commands.{script[:-3]}"
        # Every run is timed: the fastest already has the files in the page cache.
        help_time = best_time(lambda: run_quietly([sys.executable, script, "--help"]), args.repeats, warm_up=False)
        full_time = best_time(lambda: run_quietly([sys.executable, "-c", command]), args.repeats, warm_up=False)
        lines.append(f"{script:<12} {help_time:>10.2f} {full_time:>25.2f} {full_time / help_time:>5.1f}x")
    with tempfile.TemporaryDirectory() as folder:
        lines += collector_lines(Path(folder), args.run_repeats)
    write_results(args.output, lines)


if __name__ == "__main__":
    main()
