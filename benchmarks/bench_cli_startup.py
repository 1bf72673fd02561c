"""How fast the commands answer `--help`: each script's `--help`, against loading the whole program it runs
(what `--help` cost while the commands imported torch, transformers and datasets up front).

Prints, in one run, per command: the best of --repeats wall times of `python SCRIPT --help`, of
`python -c "<import the command and every library module its run loads>"`, and their ratio.
Goal: `--help` (and argument errors) in under 1.5 s.

Usage: python benchmarks/bench_cli_startup.py [--repeats 5] [--output benchmarks/results/cli_startup.txt]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import best_time, cpu_model, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# What each command's run loads: its command module, then the lazily loaded library modules.
PROGRAMS = {
    "train.py": ("checkpoints", "data", "evaluation", "models", "store", "tokens", "training_data", "loss"),
    "evaluate.py": ("data", "evaluation", "images", "scorers", "store"),
    "search.py": ("data", "images", "scorers", "search"),
    "demo.py": ("data", "evaluation", "images", "scorers", "store", "hub", "models"),
}


def run_quietly(argv):
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
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
    write_results(args.output, lines)


if __name__ == "__main__":
    main()
