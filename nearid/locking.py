"""One writer at a time for a folder that several runs may share (the embed-once store, a search index).

`one_writer` holds an exclusive lock file (the `filelock` package: `fcntl` on POSIX, `msvcrt` on
Windows; the operating system releases it when the holder dies, so a killed run never leaves a
stale lock). A second run that finds the lock taken says which process holds it (pid, host,
command, since when, from a small owner file beside the lock) and waits; it then works from what
the first run left, so neither run's work is lost. The processes of one multi-process run share
the lock through their main process, which takes it for all of them.

A lock over a network file system works only where that file system supports `fcntl` locks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)


@contextmanager
def one_writer(lock_path, what: str):
    """Hold the lock at `lock_path` for the duration of the block; wait (saying who holds it) while
    another process does. `what` names the shared thing in the waiting message, e.g. "the store in X"."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # One lock object per path in a process (`is_singleton`), so a block that holds it may call code that
    # takes it again (a search command's run holds the index lock that `SearchIndex.save` takes).
    lock = FileLock(lock_path.resolve(), is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("waiting for %s: %s is writing to it. This run goes on, from what that one leaves, when it "
                       "finishes.", what, holder(lock_path))
        lock.acquire()
    owner = _owner_file(lock_path)
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "command": " ".join(sys.argv), "since": since}))
        yield
    finally:
        if outermost:
            owner.unlink(missing_ok=True)
        lock.release()


def holder(lock_path) -> str:
    """Who holds the lock at `lock_path`, as far as its owner file says."""
    try:
        owner = json.loads(_owner_file(Path(lock_path)).read_text())
        return f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _owner_file(lock_path: Path) -> Path:
    # Apart from the lock file itself: a waiting process opens (and truncates) the lock file.
    return lock_path.with_name(lock_path.name + ".owner.json")
