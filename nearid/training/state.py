"""A run's checkpoints: save, exact resume, and the check that a resumed run keeps the checkpoint's settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nearid import checkpoints
from nearid.io import atomic_write_text


def save_checkpoint(run):
    """Head, optimizer, schedule, loss scaler, data position and history (main process; others wait)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder = Path(run.args.output_dir) / "checkpoints" / f"{checkpoints.PREFIX}{run.global_step:07d}"
        # The data position is the global step alone: every draw follows from (seed, epoch, sample),
        # and the resumed run's loader starts at that step (`StepSampler`).
        position = {"global_step": run.global_step, "run": run.run_key, "history": run.history}
        checkpoints.save(folder, accelerator.unwrap_model(run.head), run.optimizer.optimizer, run.scheduler,
                         accelerator.scaler, position, run.args.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def save_final_checkpoint(run):
    """The last step's checkpoint, unless the loop just saved it."""
    saved = checkpoints.completed(run.args.output_dir)
    if not saved or saved[-1].name != f"{checkpoints.PREFIX}{run.global_step:07d}":
        save_checkpoint(run)


def resume(run):
    """Load the requested checkpoint into the run; returns the global step to continue from."""
    path = checkpoints.resolve(run.args.output_dir, run.args.resume_from_checkpoint)
    if path is None:
        return 0
    # Its files and settings were checked before the data was read (`check_resume`).
    position = checkpoints.load(path, run.accelerator.unwrap_model(run.head), run.optimizer.optimizer,
                                run.scheduler, run.accelerator.scaler, verify=False)
    run.history = position["history"]
    if run.accelerator.is_main_process:
        trim_log(Path(run.args.output_dir) / "logs.jsonl", position["global_step"])
    run.accelerator.print(f"resumed from {path} at step {position['global_step']}")
    return position["global_step"]


def check_resume(args, key):
    """Before the data and the token pass: the checkpoint to resume is intact and was made with these settings
    (`key`: {setting: value} of everything that changes the result)."""
    path = checkpoints.resolve(args.output_dir, args.resume_from_checkpoint)
    if path is not None:
        checkpoints.check_intact(path)
        check_resume_settings(path, checkpoints.read_position(path), key)


def check_resume_settings(path, position, key):
    """Refuse to resume with settings other than the checkpoint's, naming each with both values.

    A setting the checkpoint does not record (it was written before the setting joined the key) is not
    compared, and is said."""
    recorded = position["run"]
    differ = [f"{_flag(name)} is {recorded[name]!r} in the checkpoint and {value!r} now"
              for name, value in key.items() if name in recorded and recorded[name] != value]
    if differ:
        moved = ("; a Hub base model is pinned to the checkpoint's commit with --base-model "
                 f"{recorded['base_model']}@{recorded['base_commit']}") \
            if recorded.get("base_commit") and recorded.get("base_commit") != key.get("base_commit") else ""
        raise ValueError(f"cannot resume from {path}: {'; '.join(differ)}. These change the result, so a resumed "
                         f"run must keep the checkpoint's values: pass them{moved}, or start a new --output-dir.")
    unrecorded = [_flag(name) for name in key if name not in recorded]
    if unrecorded:
        print(f"warning: {path} does not record {', '.join(unrecorded)} (written by an earlier version); these are "
              "taken as given now, unchecked.", file=sys.stderr)


# Resume-key entries that are no flag of their own.
KEY_NAMES = {"num_processes": "the number of processes", "base_commit": "the commit of --base-model"}


def _flag(name):
    return KEY_NAMES.get(name, f"--{name.replace('_', '-')}")


def trim_log(path, step):
    """Keep only the log lines of steps up to `step` (and the runs' configuration lines, which have none), so
    the steps a resumed run trains again are logged once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _is_logged_up_to(line, step)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _is_logged_up_to(line, step):
    try:
        logged = json.loads(line).get("step")
    except ValueError:
        return False  # a line cut short by a kill
    return logged is None or logged <= step
