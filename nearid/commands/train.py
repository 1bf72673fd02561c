"""Train NearID's pooling head with the paper's recipe (docs/method.md sections 2 and 3) on cached
backbone tokens.

    python train.py --positives SRC --source flux=SRC [--source ...] [--mtg SRC]
        [--train-split F --val-split F --test-split F] --output-dir runs/nearid

SRC is a Hub dataset id (SRC@REVISION pins a revision), a `save_to_disk` folder or parquet. With
--positives Aleksandar/NearID, the paper's published splits are the defaults: training on the
18,786 rows outside them, validation on the val split, the test split evaluated once at the end. The
backbone is frozen and there is no augmentation, so each image's backbone tokens never change: they
are computed once (one batched no-grad pass over the images the run will use, kept in the
embed-once store under --cache-dir) and the epochs train the head on them. `--no-token-cache` runs
the backbone on all six slots at every step instead, as the reference implementation does (same
losses, far more compute).

Scale out with `accelerate launch --multi_gpu --num_processes N train.py ...` (on CPUs:
`torchrun --nproc_per_node N train.py ...`): --per-device-batch-size samples per process, positives
gathered across processes for the loss. Checkpoints land in OUTPUT_DIR/checkpoints (the newest
--checkpoints-total-limit kept, safetensors and JSON only); `--resume-from-checkpoint latest`
continues a run exactly. The trained model is exported to OUTPUT_DIR/release as a complete Hub repo
folder with its model card, and `--push-to-hub REPO_ID` uploads it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from nearid.cli import (
    NearIDSources,
    apply_published_splits,
    build_parser,
    lazy_module,
    named_sources,
    option,
    parse,
    save_arguments,
    user_errors,
)
from nearid.numerics import PRECISIONS, resolve_precision

# The training library (`nearid.training`) and what it needs bring torch, transformers and datasets:
# loaded when the run first uses them, not for --help.
checkpoints, models = (lazy_module(f"nearid.{name}") for name in ("checkpoints", "models"))
inputs, loop, release, state, tracking = (
    lazy_module(f"nearid.training.{name}") for name in ("inputs", "loop", "release", "state", "tracking"))


# --- arguments -------------------------------------------------------------------------------------


@dataclass
class DataArguments(NearIDSources):
    """Data"""

    mtg: str | None = option(None, "MTG dataset (abdo-eldesokey/mtg-dataset or a local copy); its train split is "
                                   "added")
    mtg_repeats: int = option(4, "how many times each MTG row appears per epoch (the reference's 4x weight)", min=0)
    train_split: str | None = option(None, "JSON list of positives rows to train on (default: every row not in "
                                           "the val or test split)")
    val_split: str | None = option(None, "JSON list of rows for periodic validation (SSR/PA); default: the "
                                         "published val split for Aleksandar/NearID, none for other positives")
    test_split: str | None = option(None, "JSON list of held-out rows: never trained on, evaluated once at the end; "
                                          "default: the published test split for Aleksandar/NearID, none for other "
                                          "positives")
    skip_bad_images: bool = option(False, "leave unreadable images out (counted and reported) instead of stopping")


@dataclass
class ModelArguments:
    """Model"""

    base_model: str = option("google/siglip2-so400m-patch14-384", "SigLIP checkpoint (Hub id or folder) whose "
                                                                  "tower and pretrained MAP head start the model, or "
                                                                  "a NearID model whose head goes on training; "
                                                                  "MODEL@REV pins a Hub revision (the commit used is "
                                                                  "recorded either way)")
    base_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --base-model, the same as "
                                             "--base-model MODEL@REV")


@dataclass
class TrainingArguments:
    """Training"""

    output_dir: str = option("runs/nearid", "checkpoints, logs, resolved arguments and the release folder",
                             folder=True)
    overwrite_output_dir: bool = option(False, "delete a previous run's outputs in --output-dir and start afresh")
    seed: int = option(0, "seeds the per-epoch data draws (anchor shuffle, distractor sources, order)", min=0)
    num_epochs: int = option(11, "training epochs", min=1)
    max_steps: int | None = option(None, "stop after this many steps (smoke runs); the schedule still spans "
                                         "--num-epochs", min=1)
    per_device_batch_size: int = option(128, "samples (6 image slots each) per process and step", min=1)
    learning_rate: float = option(1e-4, "AdamW peak learning rate", min=0.0)
    weight_decay: float = option(1e-4, "AdamW weight decay (all head parameters)", min=0.0)
    warmup_steps: int = option(100, "linear warmup steps before the cosine decay to 0 (the paper's 100 fit its "
                                    "~3,300 steps; scale it to short runs)", min=0)
    max_grad_norm: float = option(1.0, "gradient-norm clip", min=0.0)
    mixed_precision: str = option("auto", "autocast precision of the token pass and the head: auto is bf16 on a "
                                          "CUDA GPU and none elsewhere (the reference used fp16 on an A100)",
                                  choices=PRECISIONS)
    temperature: float = option(0.07, "softmax temperature T of both loss tiers", min=1e-6)
    alpha: float = option(0.5, "weight of Tier 2 (distractor above random negatives)", min=0.0)
    mask_padded: bool = option(False, "drop padded slots from the loss pool (off keeps them, as the reference does)")
    token_cache: bool = option(True, "train on cached backbone tokens; --no-token-cache runs the backbone on every "
                                     "slot at every step (the reference design)")
    cache_dir: str | None = option(None, "the embed-once store of backbone tokens (default OUTPUT_DIR/token_cache); "
                                         "reused by later runs with the same backbone and preprocessing",
                                  folder=True)
    cache_dtype: str = option("float16", "storage of cached tokens: float16 (1.68 MB per so400m image), int8 "
                                         "(half of that) or float32", choices=("float16", "int8", "float32"))
    batch_size: int = option(64, "images per backbone pass while building the token cache", min=1)
    num_workers: int = option(0, "DataLoader worker processes: they decode and preprocess images for the token pass, "
                                 "and read the cached tokens of the next steps while one trains (0: the main process "
                                 "reads, and the step waits)", min=0)
    compile: bool = option(False, "run the backbone of the token pass through torch.compile (GPU: faster once "
                                  "compiled; the first and the last, smaller batch compile)")
    log_steps: int = option(10, "print and log a compact line every N steps", min=1)
    validation_steps: int | None = option(None, "validate every N steps (default: at the end of each epoch)", min=1)
    checkpointing_steps: int | None = option(None, "save a checkpoint every N steps (default: each epoch end)",
                                             min=1)
    checkpoints_total_limit: int = option(3, "keep only the newest K checkpoints", min=1)
    resume_from_checkpoint: str | None = option(None, "continue from 'latest', a checkpoint folder, or step-N")
    report_to: str = option("jsonl", "accelerate trackers, comma separated (jsonl, tensorboard, wandb, ...) or none")
    export: bool = option(True, "write OUTPUT_DIR/release, a complete Hub repo folder with its model card")
    push_to_hub: str | None = option(None, "Hub repo id to upload the release folder to (one commit)")
    hub_private: bool = option(False, "create the Hub repo as private")
    hub_revision: str | None = option(None, "branch to push to (created if missing)")
    hub_commit_message: str | None = option(None, "commit message of the upload")


GROUPS = (DataArguments, ModelArguments, TrainingArguments)


def parse_arguments(argv=None) -> tuple:
    parser = build_parser("train.py", __doc__, groups=GROUPS)
    _, groups, debug = parse(parser, GROUPS, argv)
    return groups[DataArguments], groups[ModelArguments], groups[TrainingArguments], debug


def check_arguments(data_args, train_args) -> None:
    """What the parser cannot check, before anything expensive runs."""
    named_sources(data_args.source)  # bad syntax and repeated names
    if data_args.skip_bad_images and not train_args.token_cache:
        raise ValueError("--skip-bad-images needs the token cache (it finds bad images while building it); "
                         "drop --no-token-cache or fix the images")
    checkpoints.resolve(train_args.output_dir, train_args.resume_from_checkpoint)  # fails now, not after the cache
    check_push_possible(train_args)


def check_push_possible(args) -> None:
    """Before hours of training: a push needs the export and a token (the upload itself comes last)."""
    if not args.push_to_hub:
        return
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    if not args.export:
        raise ValueError("--push-to-hub uploads the release folder, so it needs --export")
    validate_repo_id(args.push_to_hub)
    if not get_token():
        raise ValueError("--push-to-hub needs a Hugging Face token with write access: log in with `hf auth login` "
                         "or set HF_TOKEN, then run again (nothing was trained yet).")


# Every argument that changes the trained weights: a resumed run must keep each one. Left out are where
# things go (--output-dir, --cache-dir), when the run stops, logs, validates or saves (--max-steps,
# --log-steps, --validation-steps, --checkpointing-*), speed alone (--batch-size and --num-workers change no
# value; --compile changes values only within rounding, as the token store's fingerprint says), publishing
# (--export, --push-to-hub, --hub-*), and --skip-bad-images (a run with unreadable images stops before
# its first checkpoint without it). The base model is keyed by what it resolved to (`resume_key`), not by
# the revision asked for: a branch that moved on since the checkpoint is another base model.
RESUME_KEY = {
    TrainingArguments: ("seed", "num_epochs", "per_device_batch_size", "learning_rate", "weight_decay",
                        "warmup_steps", "max_grad_norm", "mixed_precision", "temperature", "alpha", "mask_padded",
                        "token_cache", "cache_dtype"),
    DataArguments: ("positives", "source", "mtg", "mtg_repeats", "train_split", "val_split", "test_split"),
}


def resume_key(data_args, train_args, base, num_processes):
    """The settings a resumed run must share with the checkpoint (`RESUME_KEY`), the base model (its Hub id or
    folder and the commit it resolved to: `models.resolve_base_model`), and the process count (the global batch
    and the data order follow from it)."""
    key = {name: getattr(args, name) for args in (train_args, data_args) for name in RESUME_KEY[type(args)]}
    return {**key, "base_model": base.name, "base_commit": base.commit, "num_processes": num_processes}


def main(argv=None):
    data_args, model_args, args, debug = parse_arguments(argv)
    hint = ("Pass --skip-bad-images to train without unreadable images; they are counted and listed in "
            "train_results.json.")
    with user_errors(debug, {"image_processing_nearid.ImageLoadError": hint}):
        return run_training(data_args, model_args, args)


def run_training(data_args, model_args, args):
    check_arguments(data_args, args)
    split_notes = apply_published_splits([data_args], data_args.positives, {"val_split": "val", "test_split": "test"})
    # Resolved before anything records it, on the device this process trains on, as evaluate.py does on --device.
    args.mixed_precision = resolve_precision(args.mixed_precision, tracking.run_device())
    accelerator = tracking.make_accelerator(args)
    for note in split_notes:
        accelerator.print(note)
    outputs = release.open_outputs(args, accelerator)
    all_args = {**vars(data_args), **vars(model_args), **vars(args), "num_processes": accelerator.num_processes}
    base = models.resolve_base_model(model_args.base_model, model_args.base_revision)  # once: folder and commit
    key = resume_key(data_args, args, base, accelerator.num_processes)
    state.check_resume(args, key)
    if accelerator.is_main_process:
        save_arguments(outputs.path("train_args.json"), "train.py", data_args, model_args, args)
    accelerator.init_trackers("nearid", config={k: str(v) for k, v in all_args.items()})
    training_set, held_out, provenance, split_sizes = inputs.load_data(data_args)
    accelerator.print(f"training data: {json.dumps(training_set.describe(), default=str)}")
    model, processor = models.nearid_from_siglip(base)
    model.to(accelerator.device)
    provider, skipped = inputs.make_provider(model, processor, training_set, held_out, data_args, args, accelerator)
    describe = {**training_set.describe(), "splits": split_sizes, "datasets": provenance}  # counts skipped images
    run = loop.make_run(args, accelerator, model, provider, training_set, held_out, key)
    run.global_step = state.resume(run)
    loop.train(run, min(run.total_steps, args.max_steps or run.total_steps))
    state.save_final_checkpoint(run)
    results = release.finish(run, outputs, processor, base, all_args, skipped, describe)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
