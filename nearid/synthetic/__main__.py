"""`python -m nearid.synthetic ...`: the command `nearid.commands.synthetic`."""

import sys

from nearid.commands.synthetic import main

main(sys.argv[1:])
