"""`python -m nearid.synthetic ...`: the command `nearid.commands.synthetic`, run as the program of this process."""

import sys

from nearid.commands.console import run

sys.exit(run("synthetic"))
