"""Identity search and clustering: index a gallery, query it, group images by identity.

The program lives in `nearid.commands.search`; this script runs it from a clone, as `nearid-search` does once installed.
"""

import sys

from nearid.commands.console import search

if __name__ == "__main__":
    sys.exit(search())
