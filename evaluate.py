"""Evaluate NearID or a baseline: the paper's benchmarks, or scores for your own generations.

The program lives in `nearid.commands.evaluate`; this script runs it from a clone, as `nearid-evaluate` does once installed.
"""

import sys

from nearid.commands.console import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
