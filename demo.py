"""Main job: NearID end to end on the synthetic benchmark, on a CPU, in about two minutes.

The program lives in `nearid.commands.demo`; this script runs it from a clone, as `nearid-demo` does once installed.
"""

import sys

from nearid.commands.console import demo

if __name__ == "__main__":
    sys.exit(demo())
