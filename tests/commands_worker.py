"""The runs of one two-process launch (one start for them all): `train.py`, `evaluate.py nearid`, `search.py
index` and `evaluate.py retrieval`, each writing into its own folders under OUT, then the nearid run that a
corrupt image stops:

    python -m torch.distributed.run --nproc_per_node 2 tests/commands_worker.py \
        TRAIN_DATA BASE_MODEL MODEL BENCHMARK SDXL GALLERY OUT

TRAIN_DATA is conftest.py's `train_synthetic`, BASE_MODEL its `base_model`; BENCHMARK a synthetic benchmark
folder (conftest.py's `synthetic`); SDXL a copy of its sdxl source with one image corrupt, which the first
nearid run skips; MODEL a NearID repo folder; GALLERY a folder of images to index. Each process appends the
name of each run that returned to OUT/completed-rank<R>.txt, so a run that failed in one process is seen
whatever the launch's exit status. The last run ("stopped": no --skip-bad-images, a cache and output folder
of its own) ends every process with the command's error and exit status 1, so a launched process that exits
otherwise, or earlier, is seen too.
"""

import os
import sys
from pathlib import Path

from nearid.cli import freeze_heavy_imports
from nearid.commands import evaluate, search, train
from tests.helpers import reset_accelerator_state, train_args

# The two-process training run that tests/test_train_multiprocess.py compares with one process.
GLOBAL_BATCH = 4
# float32 tokens and no autocast: the only differences left are the order of float sums.
EXACT = ("--cache-dtype", "float32", "--mixed-precision", "no")
# A checkpoint every 3 of the 14 steps (7 per epoch); the newest 3 are kept: steps 9, 12 and 14. Step 9, mid-epoch,
# is where the resume test continues the two-process run from.
CHECKPOINTS = ("--checkpointing-steps", "3")


def train_run_args(train_data, base_model, out, num_processes, *extra):
    """train.py's arguments for the compared run on `num_processes` processes sharing one global batch."""
    # The later --per-device-batch-size overrides train_args' default.
    return train_args(Path(train_data), base_model, out, *EXACT, *CHECKPOINTS, *extra,
                      "--per-device-batch-size", str(GLOBAL_BATCH // num_processes))


def nearid_args(model, benchmark, sdxl, out, cache, *extra):
    """evaluate.py's arguments for the NearID benchmark on `benchmark`'s positives and flux, and `sdxl`."""
    args = ["nearid", "--model", model, "--positives", f"{benchmark}/positives", "--source", f"flux={benchmark}/flux",
            "--source", f"sdxl={sdxl}", "--device", "cpu", "--batch-size", "4", "--output-dir", out,
            "--cache-dir", cache, *extra]
    return [str(arg) for arg in args]


def runs(train_data, base_model, model, benchmark, sdxl, gallery, out):
    """The launch's runs in order: {name: (a command's main, its arguments)}."""
    common = ["--model", model, "--device", "cpu", "--batch-size", "3", "--cache-dir", f"{out}/cache"]
    return {
        "train": (train.main, train_run_args(train_data, base_model, f"{out}/train", 2)),
        "nearid": (evaluate.main, nearid_args(model, benchmark, sdxl, f"{out}/nearid", f"{out}/nearid_cache",
                                              "--skip-bad-images")),
        "index": (search.main, ["index", "--images", gallery, "--index-dir", f"{out}/index", *common]),
        "retrieval": (evaluate.main, [
            "retrieval", "--positives", f"{benchmark}/positives", "--source", f"flux={benchmark}/flux",
            "--source", f"sdxl={benchmark}/sdxl", "--split-file", f"{benchmark}/splits/test.json",
            "--val-split-file", f"{benchmark}/splits/val.json", "--output-dir", f"{out}/retrieval", *common]),
        # SystemExit(1) after the error message naming the corrupt image.
        "stopped": (evaluate.main, nearid_args(model, benchmark, sdxl, f"{out}/stopped", f"{out}/stopped_cache")),
    }


def completed(out, rank):
    """The names of the runs that returned in process `rank`, in order."""
    record = Path(out) / f"completed-rank{rank}.txt"
    return record.read_text().split() if record.is_file() else []


def run(names, *paths):
    """The runs of `runs(*paths)` named in `names`, in the launch's order, each process recording the ones that
    return."""
    out = paths[-1]
    Path(out).mkdir(parents=True, exist_ok=True)
    record = Path(out) / f"completed-rank{os.environ.get('RANK', '0')}.txt"
    for name, (command, argv) in runs(*paths).items():
        if name in names:
            reset_accelerator_state()  # each run starts with accelerate's state of a fresh process
            command([str(arg) for arg in argv])
            with record.open("a") as file:
                file.write(name + "\n")
            rejoin_launch(name)


def rejoin_launch(name):
    """Under a launch, the processes joined again (torch.distributed's default group) after a run that left
    them (train.py's run ends with Accelerator.end_training, as a program's end does), under a key prefix
    of the run's own in the launch's store: the keys of the first joining there point at closed connections."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"after-{name}", store), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


if __name__ == "__main__":
    freeze_heavy_imports()  # as for a command run as its program (nearid.commands.console)
    run(("train", "nearid", "index", "retrieval", "stopped"), *sys.argv[1:])
