"""Train NearID's pooling head with the paper's recipe.

The program lives in `nearid.commands.train`; this script runs it from a clone, as `nearid-train` does once installed.
"""

import sys

from nearid.commands.console import train

if __name__ == "__main__":
    sys.exit(train())
