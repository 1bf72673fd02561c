"""scripts/side_by_side.sh, which `make test` runs the main suite and the oldest-transformers run with."""

import os
import signal
import subprocess
import time

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = str(REPO_ROOT / "scripts" / "side_by_side.sh")


def side_by_side(first, second, cwd=None):
    return subprocess.run(["bash", SCRIPT, first, second], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_both_run_at_once_and_the_second_output_follows_the_first(tmp_path):
    # Each waits for the other's file: run one after the other, neither would ever see it.
    done = side_by_side("touch first; for i in $(seq 100); do [ -e second ] && break; sleep 0.05; done; "
                        "[ -e second ] && echo first done",
                        "touch second; for i in $(seq 100); do [ -e first ] && break; sleep 0.05; done; "
                        "[ -e first ] && echo second done", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "first done\nsecond done\n"


@pytest.mark.parametrize("first, second, status", [("exit 3", "true", 3), ("true", "exit 4", 4), ("exit 3", "exit 4", 3)])
def test_a_failure_of_either_is_the_status(first, second, status):
    assert side_by_side(first, second).returncode == status


def test_an_interrupt_stops_the_second_and_what_it_started(tmp_path):
    """Ctrl-C reaches the terminal's foreground processes (here: a session of their own), which are the script
    and the first command; the second, in a process group of its own, is stopped by the script."""
    started, marker = tmp_path / "first", tmp_path / "pid"
    # SIGINT as a terminal leaves it (pytest-xdist's workers ignore it, and bash cannot trap what it inherits
    # ignored); the first command starts once the script's traps are set.
    runner = subprocess.Popen(["bash", SCRIPT, f"touch {started}; sleep 30", f"echo $$ > {marker}; sleep 30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(500):
        if started.exists() and marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.02)
    grandchild = int(marker.read_text())
    os.killpg(runner.pid, signal.SIGINT)
    runner.wait(timeout=10)
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the second command's process was left running")
