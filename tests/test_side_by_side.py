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


@pytest.mark.parametrize("first, second, status",
                         [("exit 3", "true", 3), ("true", "exit 4", 4), ("exit 3", "exit 4", 3)])
def test_a_failure_of_either_is_the_status(first, second, status):
    assert side_by_side(first, second).returncode == status


def start_two_sleepers(tmp_path):
    """The script running two commands that each start a `sleep 30` and write its pid; (script, [pids])."""
    markers = [tmp_path / "first", tmp_path / "second"]
    command = "sleep 30 & echo $! > {}; wait"
    # SIGINT with its default action, as a terminal leaves it (pytest-xdist's workers ignore it, and bash cannot
    # trap a signal it inherits ignored); a session of its own, as a terminal's foreground processes are.
    runner = subprocess.Popen(["bash", SCRIPT, command.format(markers[0]), command.format(markers[1])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 10
    while not all(m.exists() and m.read_text().strip() for m in markers) and time.monotonic() < deadline:
        time.sleep(0.02)
    return runner, [int(m.read_text()) for m in markers if m.exists() and m.read_text().strip()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("stop", ["Ctrl-C", "TERM to the script"])
def test_a_stop_ends_both_commands_and_what_they_started_at_once(tmp_path, stop):
    runner, sleepers = start_two_sleepers(tmp_path)
    try:
        assert len(sleepers) == 2, "the commands did not start"
        if stop == "Ctrl-C":  # the terminal signals its foreground processes
            os.killpg(runner.pid, signal.SIGINT)
        else:
            runner.terminate()
        runner.wait(timeout=10)  # not the 30 s of the commands
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in sleepers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(alive(pid) for pid in sleepers), "a command's process was left running"
    finally:
        for pid in sleepers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if runner.poll() is None:
            runner.kill()
