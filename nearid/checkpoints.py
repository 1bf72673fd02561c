"""Training checkpoints without pickle: loading one can never run code.

A checkpoint is a folder `OUTPUT_DIR/checkpoints/step-NNNNNNN/` with

    head.safetensors        the trained head's weights
    optimizer.safetensors   the optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
    optimizer.json          its hyperparameters (param_groups)
    scheduler.json          the learning-rate schedule's position
    scaler.json             the fp16 loss scaler's state (fp16 mixed precision only)
    position.json           the global step, the settings the run must keep, the validation history
    checksums.json          the size and XXH3-128 checksum of every file above (`nearid.integrity`)

Only safetensors and JSON are read back, never pickle; there are no RNG states to restore because
every random draw of the data follows from (seed, epoch, sample) and the head has no dropout. The
global step is the whole data position: the resumed run's training loader starts at that step, so no
batch before it is drawn or read, and nothing of the loader (workers, prefetched batches) is saved. The
folder is written under a staging name and renamed when complete, so a crash while saving leaves
the previous checkpoint as the latest. Resuming verifies every file against checksums.json first, so
a damaged file (truncated, or a single flipped bit in the weights that still loads) is named, with
the newest earlier checkpoint that verifies offered instead.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from nearid.integrity import damaged, manifest
from nearid.io import atomic_path, atomic_write_json, read_json, replacing_folder

PREFIX = "step-"
CHECKSUMS = "checksums.json"
FILES = ("head.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "position.json", CHECKSUMS)

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the file and what to do."""


def completed(output_dir) -> list:
    """Checkpoint folders that finished writing, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / "position.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(output_dir, wanted: str | None) -> Path | None:
    """The checkpoint folder `--resume-from-checkpoint` names ('latest', a folder, or step-N), checked
    before anything expensive runs; None when not resuming."""
    if not wanted:
        return None
    found = completed(output_dir)
    if wanted == "latest":
        if not found:
            raise FileNotFoundError(f"--resume-from-checkpoint latest: there is no completed checkpoint under "
                                    f"{Path(output_dir) / 'checkpoints'}; start without it")
        return found[-1]
    path = Path(wanted)
    if not path.is_dir() and (Path(output_dir) / "checkpoints" / wanted).is_dir():
        path = Path(output_dir) / "checkpoints" / wanted
    if not (path / "position.json").is_file():
        names = ", ".join(p.name for p in found[-3:]) or "none"
        raise FileNotFoundError(f"{path} is not a completed checkpoint (no position.json); pass 'latest' or one of "
                                f"the checkpoints under {Path(output_dir) / 'checkpoints'} (newest: {names})")
    return path


def save(folder, head, optimizer, scheduler, scaler, position: dict, keep: int) -> Path:
    """Write a checkpoint of the (unwrapped) `head` into `folder` (`replacing_folder`); keep the newest `keep`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with replacing_folder(folder) as staging:
        tensors, groups = _optimizer_parts(optimizer)
        with atomic_path(staging / "head.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
        with atomic_path(staging / "optimizer.safetensors") as tmp:
            save_file(tensors, str(tmp))
        atomic_write_json(staging / "optimizer.json", groups)
        atomic_write_json(staging / "scheduler.json", scheduler.state_dict())
        if scaler is not None:
            atomic_write_json(staging / "scaler.json", scaler.state_dict())
        atomic_write_json(staging / "position.json", position)  # its presence means complete
        written = [path.name for path in staging.iterdir() if not path.name.startswith(".")]
        atomic_write_json(staging / CHECKSUMS, {"files": manifest(staging, written)})
    for old in completed(folder.parent.parent)[:-keep]:
        shutil.rmtree(old)
    return folder


def _optimizer_parts(optimizer) -> tuple:
    """(safetensors-ready per-parameter state, JSON-ready param_groups) of an optimizer's state_dict."""
    state = optimizer.state_dict()
    tensors = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{param_id}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups}


def read_position(folder) -> dict:
    """The checkpoint's position.json (global step, the run's settings, history); CheckpointError when unreadable."""
    folder = Path(folder)
    return _read(folder, "position.json", lambda: read_json(folder / "position.json", "checkpoint position"))


def load(folder, head, optimizer, scheduler, scaler, verify: bool = True) -> dict:
    """Load a checkpoint into the (unwrapped) head, optimizer, scheduler and scaler; return its position.
    verify=False when `check_intact` has already checked its files in this run."""
    folder = Path(folder)
    if verify:
        check_intact(folder)
    position = read_position(folder)
    _read(folder, "head.safetensors", lambda: head.load_state_dict(_load_tensors(folder / "head.safetensors")))
    groups = _read(folder, "optimizer.json",
                   lambda: read_json(folder / "optimizer.json", "optimizer state")["param_groups"])
    _read(folder, "optimizer.safetensors", lambda: optimizer.load_state_dict(
        {"state": _per_parameter(_load_tensors(folder / "optimizer.safetensors")),
         "param_groups": [_restore_tuples(group) for group in groups]}))
    _read(folder, "scheduler.json", lambda: scheduler.load_state_dict(read_json(folder / "scheduler.json", "scheduler")))
    if scaler is not None:
        _read(folder, "scaler.json", lambda: scaler.load_state_dict(read_json(folder / "scaler.json", "loss scaler")))
    return position


def problems(folder: Path) -> dict | None:
    """{file: what is wrong} against the checkpoint's checksums.json (empty: intact); None for a checkpoint
    written before checksums."""
    if not (folder / CHECKSUMS).is_file():
        return None
    try:
        recorded = read_json(folder / CHECKSUMS, "checkpoint checksums")["files"]
        return damaged(folder, recorded)
    except (ValueError, KeyError, TypeError) as error:
        return {CHECKSUMS: f"cannot be read ({error})"}


def check_intact(folder: Path) -> None:
    """CheckpointError naming each damaged file of the checkpoint in `folder`, offering an intact earlier one."""
    found = problems(folder)
    if found is None:
        logger.warning("%s has no %s (written before checkpoints carried checksums): its files are loaded "
                       "unverified.", folder, CHECKSUMS)
        return
    if found:
        listed = "; ".join(f"{folder / name} {problem}" for name, problem in sorted(found.items()))
        raise CheckpointError(f"the checkpoint {folder} is damaged: {listed}. {_way_out(folder)}")


def _way_out(folder: Path) -> str:
    """What to do instead of resuming from the damaged checkpoint in `folder`: the newest intact earlier one."""
    older = [p for p in completed(folder.parent.parent) if p.name < folder.name]
    intact = next((p for p in reversed(older) if not problems(p)), None)
    if intact is not None:
        return (f"Resume from the previous intact checkpoint with --resume-from-checkpoint {intact.name}, or delete "
                f"{folder}.")
    return f"No intact earlier checkpoint exists; start the run again without resuming, or delete {folder}."


def _read(folder: Path, name: str, step):
    """`step()`, with any failure turned into a CheckpointError naming the file and the way out."""
    from safetensors import SafetensorError

    try:
        return step()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        detail = "is missing" if isinstance(error, FileNotFoundError) else f"cannot be read ({error})"
        raise CheckpointError(f"the checkpoint file {folder / name} {detail}: the checkpoint is damaged. "
                              f"{_way_out(folder)}") from None


def _load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(path)
    return load_file(str(path))


def _per_parameter(tensors: dict) -> dict:
    state = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return state


def _restore_tuples(group: dict) -> dict:
    return {k: (tuple(v) if k == "betas" else v) for k, v in group.items()}
