"""What the commands that embed images share: the scorer and embedding flags, loading the scorer,
joining the processes of a launch, embedding a run's images, a search index's embedder, and a run's
output folder.

`evaluate.py` and `search.py` take the same `ScorerArguments` and `EmbeddingArguments` and turn them
into a `Scorer` and the embed-once store's `FillOptions` here, so a flag means one thing in both.
Like `nearid.cli`, this module imports nothing heavy: `--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from nearid.cli import REQUIRED, lazy_module, option, save_arguments
from nearid.numerics import PRECISIONS, WEIGHT_DTYPES, resolve_device, resolve_precision

scorers, store_fill = lazy_module("nearid.scorers"), lazy_module("nearid.store.fill")
protocol, run_outputs = lazy_module("nearid.evaluation.protocol"), lazy_module("nearid.reports.run_outputs")
gallery = lazy_module("nearid.search")
accelerate = lazy_module("accelerate")  # torch with it: a command's first heavy import
# The KIND of KIND:MODEL baselines (the keys of nearid.scorers.SCORER_KINDS but nearid; a test keeps them equal).
BASELINE_KINDS = ("clip", "dinov2", "dinov3", "siglip", "siglip-mean")
# Extra advice for errors that the embedding commands raise (see `nearid.cli.user_errors`).
HINTS = {"image_processing_nearid.ImageLoadError": "Pass --skip-bad-images to leave unreadable images out; they are "
                                                   "listed in the results."}


@dataclass
class ScorerArguments:
    """The scorer"""

    model: str = option(REQUIRED, "scorer: a NearID model (Hub id or folder), or a baseline as KIND:MODEL with "
                                  f"KIND one of {', '.join(BASELINE_KINDS)}; MODEL@REV pins a Hub revision")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model, the same as MODEL@REV; pin "
                                        "a commit hash for reproducible scores (the commit used is recorded either "
                                        "way)")
    dtype: str = option("float32", "dtype of the model's weights and activations", choices=sorted(WEIGHT_DTYPES))
    device: str = option("auto", "torch device: auto (cuda when available), cpu, cuda or cuda:N")
    mixed_precision: str = option("auto", "autocast precision of the forward pass: auto is bf16 on a CUDA GPU and "
                                          "none elsewhere", choices=PRECISIONS)
    compile: bool = option(False, "run the model through torch.compile (GPU: faster once compiled; the first and "
                                  "the last, smaller batch compile)")


@dataclass
class EmbeddingArguments:
    """Embedding images (none of these change the numbers)"""

    cache_dir: str = option(".cache/embeddings", "the embed-once store: every image is embedded once per scorer "
                                                 "and kept here for later runs", folder=True)
    batch_size: int = option(32, "images per forward pass", min=1)
    num_workers: int = option(0, "DataLoader worker processes that decode and preprocess images", min=0)
    skip_bad_images: bool = option(False, "leave unreadable images out (listed in the results) instead of stopping")


class Arguments:
    """All groups of one mode, read as one namespace (`args.model`, `args.output_dir`, ...)."""

    def __init__(self, mode: str, groups: dict):
        self.mode, self.groups = mode, groups
        for group in groups.values():
            self.__dict__.update(vars(group))


def process_state(device: str = "cpu"):
    """accelerate's state of this process under torchrun / accelerate launch (or alone).

    cpu=True is what makes accelerate join the processes of a CPU launch (gloo); without it every
    process would run alone and embed every image."""
    return accelerate.PartialState(cpu=resolve_device(device) == "cpu")


def load_scorer(args, state) -> "scorers.Scorer":
    """The scorer of `ScorerArguments`, on this process's device."""
    device = resolve_device(args.device)
    if device.startswith("cuda") and state.num_processes > 1:
        device = str(state.device)  # under a multi-GPU launch, each process on its own GPU
    return scorers.Scorer(args.model, args.revision, device, scorers.DTYPES[args.dtype],
                          resolve_precision(args.mixed_precision, device), args.compile)


def fill_options(args, scorer) -> "store_fill.FillOptions":
    """How the embed-once store computes images, from `EmbeddingArguments`."""
    return store_fill.FillOptions(batch_size=args.batch_size, num_workers=args.num_workers,
                                  skip_errors=args.skip_bad_images, device=scorer.device,
                                  description=f"embedding ({scorer.kind_name})")


def embed(index, args, state) -> tuple:
    """(scorer, its embeddings of every image of `index`): the step every evaluate mode shares."""
    scorer = load_scorer(args, state)
    return scorer, protocol.embed_images(scorer, index, args.cache_dir, fill_options(args, scorer), state)


def embedder(args, state) -> "gallery.Embedder":
    """The embedder of a search index (`nearid.search.Embedder`): the scorer of `ScorerArguments`, computing through
    the embed-once store of `EmbeddingArguments`; what `search.py index` and `query` share."""
    scorer = load_scorer(args, state)
    return gallery.Embedder(scorer, args.cache_dir, fill_options(args, scorer), state)


def open_outputs(args, program: str) -> "run_outputs.RunOutputs":
    """The output folder of a run of `program`'s mode or command `args.mode` (`run_outputs.RunOutputs`:
    the previous run's files removed, `<mode>_results.json` written last), with the resolved
    arguments saved first as `<mode>_args.json`."""
    outputs = run_outputs.RunOutputs(args.output_dir, f"{args.mode}_results.json")
    save_arguments(outputs.path(f"{args.mode}_args.json"), f"{program} {args.mode}", *args.groups.values())
    return outputs
