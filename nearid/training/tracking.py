"""The accelerator of a training run and its trackers."""

from __future__ import annotations

import json
from pathlib import Path


def run_device():
    """The device this process trains on: the one the accelerator of `make_accelerator` uses."""
    from accelerate import PartialState

    return PartialState(cpu=not has_accelerator()).device


def make_accelerator(args):
    """The accelerator of a run whose `args.mixed_precision` is resolved (`numerics.resolve_precision` on
    `run_device()`): it owns the fp16 loss scaler; autocast itself is entered by `numerics.autocast`."""
    from accelerate import Accelerator, DataLoaderConfiguration

    trackers = [t for t in args.report_to.split(",") if t and t != "none"]
    log_with = [jsonl_tracker(Path(args.output_dir) / "logs.jsonl") if t == "jsonl" else t for t in trackers]
    # Without an accelerator device, accelerate joins the processes of a launch (torchrun, gloo) only
    # when told to use the CPU; otherwise every process would train alone on the whole data.
    # non_blocking: batches from pinned memory are copied to the GPU while the host goes on.
    return Accelerator(mixed_precision=args.mixed_precision, log_with=log_with or None, cpu=not has_accelerator(),
                       dataloader_config=DataLoaderConfiguration(non_blocking=True))


def has_accelerator():
    import torch

    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, MPS, XPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def jsonl_tracker(path):
    """An accelerate tracker that appends one JSON object per log call: readable without any service."""
    from accelerate.tracking import GeneralTracker

    class JsonlTracker(GeneralTracker):
        name, requires_logging_directory = "jsonl", False

        def __init__(self):
            super().__init__()
            self.path = Path(path)

        @property
        def tracker(self):
            return self.path

        def store_init_configuration(self, values):
            self.log({"config": values})

        def log(self, values, step=None, **kwargs):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as stream:
                stream.write(json.dumps({"step": step, **values}, default=str) + "\n")

    return JsonlTracker()
